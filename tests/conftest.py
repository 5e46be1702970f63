"""Shared fixtures: real models built offline, small ranked data files, a CLI runner."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

# DeepSpeed's CPU op: compiled by `make setup` (or on first use) into this folder.
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "tuna-ray" / "torch_extensions")
)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ctrl-C tests send SIGINT to a run and expect what a terminal's Ctrl-C does. A suite started in
# the background (`make test &`: a non-interactive shell's `&`) ignores SIGINT, every child
# inherits that, and Python then never raises KeyboardInterrupt: the runs went on to the end and
# both Ctrl-C tests failed (measured). A handler (not SIG_IGN) is reset to the default at exec.
if (
    threading.current_thread() is threading.main_thread()
    and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
):
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    from tuna_ray.models import tiny_llama

    return tiny_llama()


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from tuna_ray.models import smollm2_135m_instruct

    return smollm2_135m_instruct()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the tests that run stages in-process (starting Ray costs seconds).

    Tests that make a run fail on purpose go through the CLI in their own process instead: a
    Ray Train controller error can leave workers' CPUs reserved for the rest of a session.
    """
    import ray

    from tuna_ray.ray_setup import ensure_ray

    ensure_ray(min_cpus=4, trains=True)
    yield
    ray.shutdown()


class S3Server:
    """A running S3-compatible server (moto) on 127.0.0.1; ``new_bucket()`` -> ``s3://name``."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)

    def new_bucket(self) -> str:
        import uuid

        name = f"t-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def keys(self, uri: str) -> list[str]:
        """Keys of the files under ``s3://bucket/prefix``, relative to it (no folder markers)."""
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        keys = (o["Key"] for page in pages for o in page.get("Contents", []))
        return sorted(k[len(prefix) :] for k in keys if not k.endswith("/"))


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server on loopback for the session (moto's server mode, from the test extra).

    The AWS_* variables point every S3 client at it -- pyarrow in this process, and through the
    inherited environment the CLI subprocesses, the Ray they start and its workers.
    """
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield S3Server(env["AWS_ENDPOINT_URL"])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
