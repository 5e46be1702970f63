"""The whole Tuna schedule on tiny random-weight models, through the CLI and `ray job submit`,
with its run directory on S3 as a cloud run keeps it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import PATIENT_S, REPO, assert_ok, run_cli, tensorboard_scalars
from tuna_ray import storage

pytestmark = pytest.mark.slow
STAGES = ["rank_probabilistic", "train_p", "sample", "rank_contextual", "train_c", "eval"]


def _stage_status(proc) -> dict[str, str]:
    start = proc.stdout.index('{\n  "run_dir"')  # the CLI's summary, amid Ray's output
    return json.JSONDecoder().raw_decode(proc.stdout[start:])[0]["stages"]


def _attempts(run_dir: Path | str) -> dict[str, int]:
    stages = storage.read_json(storage.join(str(run_dir), "manifest.json"))["stages"]
    return {name: len(entry["attempts"]) for name, entry in stages.items()}


@pytest.fixture(scope="module")
def teacher(tiny_model_path):
    """The tiny teacher at one address for every run of a test. (An embedded server gets a new
    port per run, and the openai engine keys its cache on base_url: see the issue-9 report.)"""
    from tuna_ray.serve.local import start_local_server

    with start_local_server(str(tiny_model_path), served_model_name="teacher") as server:
        yield server


@pytest.mark.timeout(4 * PATIENT_S)
def test_whole_schedule_on_s3_stops_resumes_evaluates_and_reruns_only_what_changed(
    tmp_path, monkeypatch, s3_server, teacher
):
    """The configuration that ships, on tiny models: ``run_dir`` on S3 (a real S3 server on
    loopback). The run dies in train_p, its node's caches and half of the teacher's results
    are lost; the rerun finishes every stage from the bucket, pays the teacher nothing,
    evaluates, and puts the evaluation at the top of the report. A no-op rerun changes nothing;
    a changed evaluation re-runs the evaluation only, from the answers it already has."""
    from transformers import AutoModelForCausalLM

    from tuna_ray.data.parts import finished_ids
    from tuna_ray.models import resolve_model

    monkeypatch.setenv("TUNA_RAY_NODE_CACHE", str(tmp_path / "node"))
    run_dir = s3_server.new_bucket() + "/runs/tiny"
    args = (
        "run", "--config", "jobs/configs/tiny-cpu.yaml", f"run_dir={run_dir}",
        f"probabilistic.engine.base_url={teacher.base_url}",
        # train_p dies at step 3 (after its checkpoint at step 2) and may not retry: the run
        # stops there, like a driver lost half-way. Operational settings: no hash changes.
        "train_p.checkpoint_every=2", "train_p.fail_at_step=3", "scaling.max_failures=0",
    )  # fmt: skip
    first = run_cli(*args, timeout=2 * PATIENT_S)
    assert first.returncode != 0
    keys = s3_server.keys(run_dir)
    assert "rank_probabilistic/manifest.json" in keys, first.stderr[-4000:]
    assert any(k.startswith("train_p/checkpoint_step0000002/") for k in keys), keys
    assert "train_p/train_report.json" not in keys and "train_p/_lease.json" not in keys
    assert not any(k.startswith("sample/") for k in keys)
    # The teacher's responses were kept in the run storage, as compacted cache parts.
    assert [k for k in keys if k.startswith("rank_probabilistic/cache/part-")]

    # Lose the node (its SQLite response cache and staged models) and half of the first
    # stage's results: the rerun must finish that stage from the bucket, paying nothing.
    shutil.rmtree(tmp_path / "node", ignore_errors=True)
    rank_p = storage.join(run_dir, "rank_probabilistic")
    for key in [k for k in keys if k.startswith("rank_probabilistic/parts/")][1:]:
        storage.delete_file(storage.join(run_dir, key))
    for name in ("manifest.json", "ranked.parquet"):
        storage.delete_file(storage.join(rank_p, name))
    done_before = len(finished_ids(rank_p))
    assert 0 < done_before < 16

    teacher.reset_stats()
    second = run_cli(*args, timeout=2 * PATIENT_S)
    assert_ok(second)
    assert teacher.stats()["requests"] == 0  # every missing id came from the cache in S3
    # the two stages that ran before (one finished, then its outputs lost; one failed) resumed
    resumed = {"rank_probabilistic": "resumed", "train_p": "resumed"}
    assert _stage_status(second) == {**dict.fromkeys(STAGES, "ran"), **resumed}
    manifest = storage.read_json(storage.join(rank_p, "manifest.json"))
    assert manifest["counts"]["done_before"] == done_before
    assert manifest["usage_this_run"]["requests"] == 0
    assert manifest["usage_this_run"]["cached"] > 0
    # train_p resumed from its step-2 checkpoint instead of starting over.
    consumed = [
        storage.read_json(storage.join(run_dir, k))
        for k in s3_server.keys(run_dir)
        if k.startswith("train_p/consumed/")
    ]
    assert sorted({c["resumed_from_step"] for c in consumed}) == [0, 2], consumed
    # The final model lives in the bucket; resolve_model stages it for from_pretrained.
    AutoModelForCausalLM.from_pretrained(
        resolve_model(storage.join(run_dir, "train_c", "hf_model"))
    )

    local = tmp_path / "copy"  # what a user copies down to read the run
    storage.download_dir(run_dir, local)
    for stage in ("rank_probabilistic", "sample", "rank_contextual"):
        manifest = json.loads((local / stage / "manifest.json").read_text())
        assert manifest["counts"]["failed"] == 0 and manifest["input"]["used"] == 16
        assert manifest["usage_total"]["completion_tokens"] > 0  # every stage counts tokens
    for stage in ("train_p", "train_c"):
        train_report = json.loads((local / stage / "train_report.json").read_text())
        assert train_report["total_steps"] > 0
        assert not list((local / stage).glob("checkpoint_step*"))  # pruned after export
        curves = tensorboard_scalars(local / stage / "tensorboard")
        assert len(curves["train/loss"]) == train_report["total_steps"]
    # The evaluation: the start model, Tuna_p and Tuna on the same tasks, at the report's top.
    results = json.loads((local / "eval" / "results.json").read_text())
    assert set(results["models"]) == {"start", "tuna_p", "tuna"}
    for model in results["models"].values():
        assert model["tasks"]["alpaca_eval_ranked"]["pairs"] == 48
        assert model["tasks"]["vicuna_qa"]["n"] == 4
    assert sorted(p.name for p in (local / "eval" / "tensorboard").iterdir()) == sorted(
        results["models"]
    )
    report = (local / "report.md").read_text()
    assert report.index("## Evaluation") < report.index("## Summary")
    assert report.index("| start |") < report.index("| tuna_p |") < report.index("| tuna |")
    assert "scripted stand-in" in report  # what stood in for what
    assert all(s in report for s in STAGES)
    assert "resumed (2 attempts)" in report
    assert (local / "report" / "train_c_training.png").exists()
    assert (local / "report" / "evaluation.png").exists()
    manifest = json.loads((local / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    attempts = {**dict.fromkeys(STAGES, 1), "rank_probabilistic": 2, "train_p": 2}
    assert _attempts(local) == attempts

    again = run_cli(*args)  # nothing changed: every stage skipped, no server started
    assert_ok(again)
    assert "starting embedded server" not in again.stderr
    # as they ended, figures kept: a finished run's record is not overwritten by a no-op rerun
    assert _stage_status(again) == _stage_status(second)
    assert storage.read_text(storage.join(run_dir, "report.md")) == report
    assert _attempts(run_dir) == attempts

    # A changed stage config re-runs that stage (here the last, the cheapest to re-run) and
    # every stage after it; the evaluation reuses the answers and verdicts it already has: only
    # its statistics change, not the estimates.
    changed = run_cli(*args, "eval.bootstrap.resamples=300", timeout=2 * PATIENT_S)
    assert_ok(changed)
    assert _stage_status(changed) == {**dict.fromkeys(STAGES, "ran"), **resumed}
    assert "[5/6] train_c: finished before, skipped" in changed.stderr
    assert "[6/6] eval: starting" in changed.stderr
    assert "finished with this digest, skipping" in changed.stderr  # its Ray Data stages
    assert "discarding the previous results" not in changed.stderr
    assert _attempts(run_dir) == attempts  # eval's record starts over: one new attempt
    rerun = storage.read_json(storage.join(run_dir, "eval", "results.json"))
    assert set(rerun["models"]) == set(results["models"])
    for label, model in results["models"].items():
        for task, result in model["tasks"].items():
            assert rerun["models"][label]["tasks"][task]["value"] == result["value"], (label, task)


def test_ctrl_c_beside_another_ray_then_ray_job_submit_resumes(tmp_path, teacher):
    """Ctrl-C in the teacher stage of a local run -- with another Ray (a local head) running on
    the machine -- prints one line, keeps the parts written so far and records "interrupted";
    the same run, submitted to that head with `ray job submit`, resumes with the missing ids
    only, and the report counts both attempts."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    run_dir = tmp_path / "run"
    overrides = [
        f"run_dir={run_dir}", "variant=tuna_p", "eval=null", "probabilistic.scaling.batch_size=2",
        f"probabilistic.engine.base_url={teacher.base_url}",
    ]  # fmt: skip
    # A slow teacher: the Ctrl-C lands while the stage still has most of its records to go.
    teacher.set_faults(1.0, kinds=["slow"], slow_seconds=2.0)
    head, dashboard = _start_head(tmp_path)
    try:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        first = subprocess.Popen(
            [sys.executable, "-m", "tuna_ray", "run", "--config", "jobs/configs/tiny-cpu.yaml",
             *overrides],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        parts = run_dir / "rank_probabilistic" / "parts"
        deadline = time.time() + PATIENT_S
        while not (parts.exists() and len(list(parts.glob("*.parquet"))) >= 2):
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.time() < deadline, "no part written in time"
            time.sleep(0.5)
        first.send_signal(signal.SIGINT)  # Ctrl-C, once: a swallowed one would let the run go on
        try:
            _, err = first.communicate(timeout=PATIENT_S / 3)  # Ray's shutdown: slow when busy
        except subprocess.TimeoutExpired:
            first.kill()
            raise AssertionError(f"the run went on {PATIENT_S / 3:.0f} s after a Ctrl-C") from None
        teacher.set_faults(0.0)
        assert first.returncode == 130, err[-3000:]
        assert err.rstrip().splitlines()[-1].startswith("tuna-ray run: interrupted: ")
        assert "Traceback" not in err and "multiple active Ray" not in err, err[-3000:]
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert manifest["status"] == "interrupted"
        assert manifest["stages"]["rank_probabilistic"]["status"] == "interrupted"
        assert "interrupted" in (run_dir / "report.md").read_text()
        kept = len(list(parts.glob("*.parquet")))

        client = JobSubmissionClient(dashboard)
        job = _submit(
            client,
            entrypoint="python jobs/tuna.py --config jobs/configs/tiny-cpu.yaml "
            + " ".join(overrides),
            runtime_env={
                "working_dir": str(REPO),
                "excludes": [".venv", "runs", ".git"],
                "env_vars": {"RAY_AUTH_MODE": "disabled"},
            },
        )
        deadline = time.time() + PATIENT_S
        while not (status := client.get_job_status(job)).is_terminal():
            assert time.time() < deadline, "job did not finish in time"
            time.sleep(2)
        logs = client.get_job_logs(job)
        assert status == JobStatus.SUCCEEDED, logs[-3000:]
        assert "Traceback" not in logs, logs[-3000:]
    finally:
        _stop_head(head)
    assert (run_dir / "train_p" / "hf_model" / "model.safetensors").exists()
    rank_p = json.loads((run_dir / "rank_probabilistic" / "manifest.json").read_text())
    assert rank_p["counts"]["done_before"] == 2 * kept  # 2 records per part
    assert rank_p["counts"]["ranked"] == 16
    # the usage of the interrupted attempt's parts is in the total, not only this run's
    total, this_run = rank_p["usage_total"], rank_p["usage_this_run"]
    assert total["completion_tokens"] > this_run["completion_tokens"] > 0
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert {k: v["status"] for k, v in stages.items()} == {
        "rank_probabilistic": "resumed",
        "train_p": "ran",
    }
    assert "resumed (2 attempts)" in (run_dir / "report.md").read_text()


def _start_head(tmp_path: Path) -> tuple[subprocess.Popen, str]:
    """A local Ray head with a dashboard (someone else's cluster on this machine, and the one
    jobs are submitted to), in its own session: stopping it kills its processes only -- `ray
    stop` would kill every Ray on the machine, the test session's own too. Its session files
    go where Ray's go by default (/tmp/ray), as on a user's machine: Ray's processes on it that
    look for "the" cluster find it there.

    On a busy machine `ray start` can give up on one of its processes and exit (its raylet: a
    fixed 30 s wait; its Ray Client server: "Timed out waiting for node info", measured beside
    two busy loops); as a user would, the test starts it again (new ports, the leftovers
    killed), with the pauses and number of starts of our own local Ray (ray_setup), and a last
    failure shows `ray start`'s own output. A start counts once `ray start` watches its
    processes, its dashboard and Ray Client server answer, and none has died."""
    from tuna_ray.ray_setup import LOCAL_STARTS, RESTART_PAUSE_S

    for attempt in range(1, LOCAL_STARTS + 1):
        log = tmp_path / f"ray-start-head-{attempt}.log"
        head, dashboard = _start_head_once(log)
        if head is not None:
            return head, dashboard
        if attempt < LOCAL_STARTS:
            time.sleep(RESTART_PAUSE_S * attempt)
    pytest.fail(
        f"ray start --head exited {LOCAL_STARTS} times; the last output:\n"
        + log.read_text()[-3000:]
    )


def _start_head_once(log: Path) -> tuple[subprocess.Popen | None, str]:
    from tuna_ray.ray_setup import _free_port

    venv_bin = Path(sys.executable).parent  # as with an activated venv: `python` is ours
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    port, client_port = _free_port(), _free_port()
    with log.open("wb") as out:
        head = subprocess.Popen(
            [str(venv_bin / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             f"--port={_free_port()}", "--num-cpus=4", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={port}", "--disable-usage-stats",
             # Its job agent's HTTP port: the default (52365) is taken by the test session's
             # own Ray, and a head whose agent cannot bind it answers "No available agent".
             f"--dashboard-agent-listen-port={_free_port()}",
             # It listens once it has found its node (a wait that times out when busy).
             f"--ray-client-server-port={client_port}"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    dashboard = f"http://127.0.0.1:{port}"
    deadline = time.time() + PATIENT_S
    while head.poll() is None:
        if _head_up(log, dashboard, client_port):
            time.sleep(3)  # its first checks of its processes (one a second)
            if head.poll() is None:
                return head, dashboard
            break
        assert time.time() < deadline, f"the head did not come up; its output: {log}"
        time.sleep(2)
    _stop_head(head)  # it gave up during startup: kill what it left; start again
    return None, dashboard


def _head_up(log: Path, dashboard: str, client_port: int) -> bool:
    """`ray start` watches its processes now, its dashboard answers and its Ray Client server
    listens (on the node's address, whichever that is)."""
    from ray.job_submission import JobSubmissionClient

    if "will now block forever" not in log.read_text():
        return False
    try:
        JobSubmissionClient(dashboard).list_jobs()
    except Exception:  # noqa: BLE001 -- not up yet
        return False
    return _listening(client_port)


def _listening(port: int) -> bool:
    import psutil

    return any(
        c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
        for c in psutil.net_connections(kind="tcp")
    )


def _submit(client, **job) -> str:
    """Submit once the head's job agent is up (it starts a little after the dashboard)."""
    deadline = time.time() + PATIENT_S
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(2)


def _stop_head(head: subprocess.Popen) -> None:
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:  # its whole session has already exited
        pass
    head.wait(timeout=30)
