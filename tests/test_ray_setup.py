"""Starting a private local Ray on a busy machine: a start that times out is made again, and
the workers run at the driver's priority (Ray's default puts them 15 below it)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.support import PATIENT_S, REPO

pytestmark = pytest.mark.slow

# In a fresh process (this one may hold the session's Ray): the first raylet that Ray starts is
# stopped (SIGSTOP) as soon as it appears, so it never registers with its GCS -- what a raylet
# starved of CPU looks like to ray.init, which gives up after its fixed 30 s wait.
SCRIPT = textwrap.dedent(
    """
    import logging, os, signal, sys, threading, time
    import psutil, ray
    from tuna_ray.ray_setup import start_local_ray

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    stopped = []

    def stop_the_first_raylet():
        while not stopped:
            for proc in psutil.Process().children(recursive=True):
                try:
                    if proc.name() == "raylet":
                        os.kill(proc.pid, signal.SIGSTOP)
                        stopped.append(proc.pid)
                        return
                except psutil.Error:
                    pass
            time.sleep(0.02)

    threading.Thread(target=stop_the_first_raylet, daemon=True).start()
    start_local_ray(2)
    print("task niceness:", ray.get(ray.remote(lambda: os.nice(0)).remote()))
    print("stopped raylet still there:", psutil.pid_exists(stopped[0]))
    raylets = [p for p in psutil.Process().children(recursive=True) if p.name() == "raylet"]
    print("raylets:", len(raylets))
    """
)


def test_a_start_that_times_out_is_made_again_and_workers_keep_the_drivers_priority():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        preexec_fn=lambda: os.nice(3),  # the driver, as under `nice -n 3`
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=PATIENT_S,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.splitlines() == [
        "task niceness: 3",
        "stopped raylet still there: False",
        "raylets: 1",
    ]
    assert proc.stderr.count("starting a private local Ray") == 2, proc.stderr[-4000:]
    assert "the local Ray did not start in time (a busy machine?)" in proc.stderr
    assert "starting it again in 10 s (2/5)" in proc.stderr
