"""Run ``tuna-ray serve`` as a child process: an embedded teacher / judge, or a test server.

Stage: serve. ``start_local_server`` spawns ``python -m tuna_ray serve --port 0 ...``, waits
for its "listening on" line and for ``/v1/models`` to answer, and returns a handle::

    with start_local_server("builtin:tiny-llama") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused")
        ...
        server.stats()  # {"requests": ..., "by_path": {...}, "faults": {...}, ...}

    start_local_server(mode="fixed", fixed_delay_s=0.05)   # canned answers, served as "fixed"
    start_local_server(mode="judge", judge_rule="length")  # scripted judge, served as "judge"
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Self

from tuna_ray.serve.faults import FAULT_KINDS

_LISTENING = re.compile(r"tuna-ray serve: listening on (http://\S+)")


class LocalServerError(RuntimeError):
    """The server did not come up; carries the tail of its output."""


class LocalServer:
    """Handle of a running ``tuna-ray serve`` child process."""

    def __init__(self, process: subprocess.Popen, root_url: str, output: collections.deque):
        self.process = process
        self.root_url = root_url  # http://127.0.0.1:PORT
        self.base_url = root_url + "/v1"  # what an OpenAI client takes
        self._output = output

    def output_tail(self) -> str:
        """The last lines the server printed (stdout and stderr), for diagnostics."""
        return "".join(self._output)

    def stats(self) -> dict:
        return self._call("GET", "/admin/stats")

    def reset_stats(self) -> None:
        """Zero the request counts and restart the seeded fault sequence."""
        self._call("POST", "/admin/reset", {})

    def set_faults(
        self,
        rate: float,
        kinds: tuple[str, ...] | list[str] = FAULT_KINDS,
        *,
        seed: int = 0,
        slow_seconds: float = 5.0,
    ) -> dict:
        """Replace the fault configuration (re-seeds the sequence) without a restart."""
        config = {"rate": rate, "kinds": list(kinds), "seed": seed, "slow_seconds": slow_seconds}
        return self._call("POST", "/admin/faults", config)

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.root_url + path,
            data=data,
            method=method,
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_local_server(
    model: str | None = None,
    *,
    mode: str = "model",
    fixed_delay_s: float = 0.0,
    judge_rule: str = "length",
    fault_rate: float = 0.0,
    fault_kinds: tuple[str, ...] | list[str] = FAULT_KINDS,
    fault_seed: int = 0,
    slow_seconds: float = 5.0,
    served_model_name: str | None = None,
    timeout: float = 120.0,
    extra_args: tuple[str, ...] = (),
) -> LocalServer:
    """Start a server on 127.0.0.1 at a free port; raise ``LocalServerError`` if it fails.

    ``mode``: ``"model"`` (needs ``model``), ``"fixed"`` or ``"judge"`` (``model``, if given, is
    only the served name); ``fixed_delay_s`` and ``judge_rule`` apply to the scripted modes.
    """
    if mode == "model" and model is None:
        raise ValueError("start_local_server: mode 'model' needs a model")
    command = [
        sys.executable, "-m", "tuna_ray", "serve",
        "--mode", mode,
        *(("--model", str(model)) if model is not None else ()),
        *(("--fixed-delay-s", str(fixed_delay_s), "--judge-rule", judge_rule)
          if mode != "model" else ()),
        "--port", "0",
        "--fault-rate", str(fault_rate),
        "--fault-kinds", ",".join(fault_kinds),
        "--fault-seed", str(fault_seed),
        "--slow-seconds", str(slow_seconds),
        *(("--served-model-name", served_model_name) if served_model_name else ()),
        *extra_args,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1", TRANSFORMERS_VERBOSITY="error")
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    output: collections.deque[str] = collections.deque(maxlen=200)
    found: dict[str, str] = {}
    ready = threading.Event()

    def drain() -> None:
        # Keep reading for the server's whole life, so a full pipe never blocks it.
        for line in process.stdout:
            output.append(line)
            if not ready.is_set() and (match := _LISTENING.search(line)):
                found["url"] = match.group(1)
                ready.set()
        ready.set()

    threading.Thread(target=drain, name="tuna-ray-serve-output", daemon=True).start()
    deadline = time.monotonic() + timeout
    try:
        if not ready.wait(timeout) or "url" not in found:
            raise LocalServerError(_failure(process, "never printed its address", output))
        server = LocalServer(process, found["url"], output)
        while True:
            try:
                urllib.request.urlopen(server.base_url + "/models", timeout=5).close()
                return server
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise LocalServerError(_failure(process, f"not answering: {exc}", output))
                time.sleep(0.1)
    except BaseException:
        if process.poll() is None:
            process.kill()
            process.wait()
        raise


def _failure(process: subprocess.Popen, what: str, output: collections.deque) -> str:
    code = process.poll()
    state = "still running" if code is None else f"exited with {code}"
    tail = "".join(output)[-4000:]
    return f"tuna-ray serve {what} ({state}); its output:\n{tail}"
