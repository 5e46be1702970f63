"""Test helpers shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "jobs" / "data"
# Hang guards, not speed checks (no test asserts a speed): a wait gives up only after this long.
# Sized for a 2-core machine with two busy loops beside the suite, where stop 18 measured tests
# 5-20x slower than idle (a vLLM stage test 1737 s against 78 s idle); a run that is merely slow
# must not fail. A stuck one still fails, with its output, inside CI's limit. Every wait for a
# run to make progress gets all of it: beside the load, one CLI run took 10 min to log its first
# line (imports), and starting Ray took minutes more.
PATIENT_S = 1800


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def synthetic_ranked(n: int, candidates: int = 3, seed: int = 0) -> list[dict]:
    """Ranked records with short, distinct answers (varied lengths, so N-token counts differ)."""
    import random

    rng = random.Random(seed)
    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "river",
        "stone",
        "cloud",
        "paper",
        "light",
        "green",
        "quick",
        "slow",
    ]
    records = []
    for i in range(n):
        responses = [
            " ".join(rng.choice(words) for _ in range(rng.randint(2, 12))) + f" {i}.{k}"
            for k in range(candidates)
        ]
        records.append(
            {
                "id": f"rec-{i:03d}",
                "instruction": f"Write about item {i}.",
                "input": "",
                "responses": responses,
            }
        )
    return records


def run_cli(
    *args: str, timeout: float = PATIENT_S, cwd: Path | None = None, path: str | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -m tuna_ray ARGS`` in a fresh process (a fresh local Ray each time), with
    ``path`` as its PATH if given."""
    return subprocess.run(
        [sys.executable, "-m", "tuna_ray", *args],
        check=False,
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **({"PATH": path} if path else {})},
    )


def foreign_ninja_first(folder: Path) -> tuple[str, Path]:
    """A PATH whose first ``ninja`` is not this environment's (as a system ninja 1.11 is beside
    the venv's 1.13), and the file that ninja writes each call into: a tripwire that fails
    every build it is asked to run. Returns (PATH, calls file)."""
    calls = folder / "foreign-ninja-calls.txt"
    bin_dir = folder / "foreign-bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    ninja = bin_dir / "ninja"
    ninja.write_text(f'#!/bin/sh\necho "ninja $*" >> "{calls}"\nexit 1\n')
    ninja.chmod(0o755)
    return os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]), calls


def run_here(*args: str) -> subprocess.CompletedProcess:
    """``tuna-ray ARGS`` in this process, on the Ray it has (``ray_session``): what ``run_cli``
    returns (exit status, stdout, stderr with the log lines), without a fresh Python and a fresh
    Ray: one rank-probabilistic run on the tiny teacher took 14.4 CPU-s here against 44.6 through
    ``run_cli`` (2 cores, medians of 3, interleaved). For stage runs whose test is not about the
    process: a run stopped by a signal, runs side by side, a run whose Ray workers need this
    test's environment (Ray's workers keep the session's), and a run asserting on Ray's start
    get ``run_cli``."""
    import contextlib
    import io
    import logging
    import traceback

    from tuna_ray.cli import LOG_FORMAT, main

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse
                code = exc.code if isinstance(exc.code, int) else 1
            except Exception:  # noqa: BLE001 -- as the process would: a traceback, exit 1
                traceback.print_exc()
                code = 1
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return subprocess.CompletedProcess(["tuna-ray", *args], code, out.getvalue(), err.getvalue())


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-80:])
        raise AssertionError(f"exit {proc.returncode}:\n{tail}")


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the event files under ``folder`` (TFRecord framing, tensorboardX protos)."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4  # length, its CRC, the record, its CRC
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out
