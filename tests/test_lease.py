"""One writer per output directory (tuna_ray.lease), on local disk and on S3, in real processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import PATIENT_S, REPO, SHIPPED, assert_ok, run_cli
from tuna_ray import lease, storage

_CONTENDER = """
import sys, time
from tuna_ray import lease
directory, start_at = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, start_at - time.time()))  # all contenders claim at the same instant
try:
    held = lease.acquire_lease(directory, what="contender", settle_s=0.5, heartbeat_s=0.2)
except lease.LeaseHeldError as exc:
    print("refused:", exc)
    sys.exit(3)
print("won")
time.sleep(2.0)
held.check()
held.release()
"""


def _contend(directory: str, n: int) -> list[subprocess.CompletedProcess]:
    start_at = time.time() + 4.0  # after every interpreter has started
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONTENDER, directory, str(start_at)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=PATIENT_S)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


@pytest.mark.parametrize("where", ["local", "s3"])
def test_concurrent_claims_have_exactly_one_winner(tmp_path, where, request):
    if where == "s3":
        directory = request.getfixturevalue("s3_server").new_bucket() + "/run/stage"
    else:
        directory = str(tmp_path / "stage")
    results = _contend(directory, 3)
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 3, 3], [(r.returncode, r.stdout, r.stderr[-500:]) for r in results]
    refusals = [r.stdout for r in results if r.returncode == 3]
    assert all(f"host {socket.gethostname()} pid" in r for r in refusals), refusals
    assert lease.read_holder(directory) is None  # the winner gave it back


def test_second_holder_is_refused_with_the_holders_name(tmp_path):
    directory = str(tmp_path / "out")
    with lease.hold_lease(directory, what="rank_probabilistic", settle_s=0):
        holder = json.loads((tmp_path / "out" / "_lease.json").read_text())
        assert holder["pid"] == os.getpid() and holder["what"] == "rank_probabilistic"
        proc = subprocess.run(
            [sys.executable, "-c", _CONTENDER, directory, "0"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 3
        assert f"{directory} is in use by another run: host {socket.gethostname()} pid " in (
            proc.stdout
        )
        assert f"pid {os.getpid()} " in proc.stdout and "rank_probabilistic" in proc.stdout
    assert not (tmp_path / "out" / "_lease.json").exists()


def _write_holder(directory: Path, **fields) -> None:
    now = time.time()
    record = {
        "token": "someone-else",
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_namespace": lease._pid_namespace(),
        "started": now,
        "heartbeat": now,
        "ttl_s": 90.0,
        **fields,
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tmp").write_text(json.dumps(record))
    os.replace(directory / "tmp", directory / "_lease.json")  # atomic, as the lease writes it


def test_dead_holder_on_this_host_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_holder(tmp_path / "out", pid=dead.pid)
    with lease.hold_lease(str(tmp_path / "out"), settle_s=0) as held:
        assert held.record["pid"] == os.getpid()
    # The same pid in another container's pid namespace says nothing about that process.
    _write_holder(tmp_path / "out", pid=dead.pid, pid_namespace="pid:[1]")
    with pytest.raises(lease.LeaseHeldError):
        lease.acquire_lease(str(tmp_path / "out"), settle_s=0)


def test_expired_heartbeat_elsewhere_is_taken_over_live_one_is_not(tmp_path):
    _write_holder(tmp_path / "out", host="other-node", heartbeat=time.time() - 10)
    with pytest.raises(lease.LeaseHeldError, match="host other-node pid"):
        lease.acquire_lease(str(tmp_path / "out"), settle_s=0)
    _write_holder(tmp_path / "out", host="other-node", heartbeat=time.time() - 91)
    with lease.hold_lease(str(tmp_path / "out"), settle_s=0) as held:
        assert held.record["host"] == socket.gethostname()


def test_heartbeat_keeps_it_fresh_and_a_takeover_is_noticed(tmp_path):
    directory = tmp_path / "out"
    held = lease.acquire_lease(str(directory), settle_s=0, heartbeat_s=0.1)
    try:
        first = json.loads((directory / "_lease.json").read_text())["heartbeat"]
        time.sleep(0.5)
        assert json.loads((directory / "_lease.json").read_text())["heartbeat"] > first
        lease.check_held(str(directory))  # still ours
        _write_holder(directory, host="other-node")  # another run took it over
        with pytest.raises(lease.LeaseLostError, match="took this output over"):
            lease.check_held(str(directory))
    finally:
        held.release()
    assert json.loads((directory / "_lease.json").read_text())["token"] == "someone-else"


def test_reentrant_and_clear_dir_keeps_the_lease(tmp_path):
    directory = str(tmp_path / "out")
    with lease.hold_lease(directory, settle_s=0) as outer:
        with lease.hold_lease(directory, settle_s=0) as inner:
            assert inner is outer
        (tmp_path / "out" / "old.parquet").write_text("x")
        lease.clear_dir(directory)
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["_lease.json"]
    assert list((tmp_path / "out").iterdir()) == []


# ---- two real runs of one stage into one directory ------------------------------------------


def _instructions(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "instructions.json"
    path.write_text(json.dumps(json.loads((SHIPPED / "alpaca_data_first200.json").read_text())[:n]))
    return path


@pytest.mark.slow
def test_two_runs_of_one_stage_same_or_different_config(tmp_path):
    from tuna_ray.serve.local import start_local_server

    data, out = _instructions(tmp_path, 12), tmp_path / "out"

    def args(server, *extra):
        return [
            "rank-probabilistic",
            "--config",
            "jobs/configs/rank-probabilistic-tiny.yaml",
            f"input.path={data}",
            f"output_dir={out}",
            f"engine.base_url={server.base_url}",
            "engine.model=fixed",
            "engine.cache_dir=null",
            "scaling.actors=1",
            "scaling.batch_size=2",
            *extra,
        ]

    with start_local_server(mode="fixed", fixed_delay_s=1.5) as server:
        first = subprocess.Popen(
            [sys.executable, "-m", "tuna_ray", *args(server)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.time() + PATIENT_S
            while not (out / "_lease.json").exists():
                assert time.time() < deadline and first.poll() is None, "no lease taken"
                time.sleep(0.1)
            holder = json.loads((out / "_lease.json").read_text())
            same = run_cli(*args(server))
            other = run_cli(*args(server, "sampling.max_tokens=8"))
            assert first.poll() is None, "the first run ended before the others were refused"
            _, stderr = first.communicate(timeout=PATIENT_S)
        finally:
            if first.poll() is None:
                first.kill()
        for proc in (same, other):
            assert proc.returncode == 2, proc.stderr[-2000:]
            assert (
                f"{out} is in use by another run: host {holder['host']} pid {first.pid} "
                in (proc.stderr.splitlines()[-1])
            )
        assert first.returncode == 0, stderr[-3000:]
        # The first run's results, whole and alone: every id once, its config, 12 requests.
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["counts"]["ranked"] + manifest["counts"]["failed"] == 12
        assert (out / "config_hash.txt").read_text().strip() == manifest["config_hash"]
        assert server.stats()["requests"] == 12
        assert not (out / "_lease.json").exists()

        # Once the first is done, the other config may take the directory over.
        assert_ok(run_cli(*args(server, "sampling.max_tokens=8")))
        assert (
            json.loads((out / "manifest.json").read_text())["config_hash"]
            != (manifest["config_hash"])
        )


def test_lease_file_on_s3_is_cleaned_up(s3_server):
    directory = s3_server.new_bucket() + "/run/stage"
    with lease.hold_lease(directory, settle_s=0.1):
        assert s3_server.keys(directory) == ["_lease.json"]
        assert storage.exists(storage.join(directory, "_lease.json"))
    assert s3_server.keys(directory) == []
