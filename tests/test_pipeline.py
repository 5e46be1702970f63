"""The whole Tuna schedule on tiny random-weight models, through the CLI and `ray job submit`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import REPO, assert_ok, run_cli, tensorboard_scalars

pytestmark = pytest.mark.slow
STAGES = ["rank_probabilistic", "train_p", "sample", "rank_contextual", "train_c", "eval"]


def _stage_status(proc) -> dict[str, str]:
    start = proc.stdout.index('{\n  "run_dir"')  # the CLI's summary, amid Ray's output
    return json.JSONDecoder().raw_decode(proc.stdout[start:])[0]["stages"]


def _attempts(run_dir: Path) -> dict[str, int]:
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    return {name: len(entry["attempts"]) for name, entry in stages.items()}


def test_whole_schedule_with_evaluation_then_rerun_skips_and_redoes_only_what_changed(tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    args = ("run", "--config", "jobs/configs/tiny-cpu.yaml", f"run_dir={run_dir}")
    first = run_cli(*args)
    assert_ok(first)
    assert _stage_status(first) == dict.fromkeys(STAGES, "ran")
    for stage in ("rank_probabilistic", "sample", "rank_contextual"):
        manifest = json.loads((run_dir / stage / "manifest.json").read_text())
        assert manifest["counts"]["failed"] == 0 and manifest["input"]["used"] == 16
        assert manifest["usage_total"]["completion_tokens"] > 0  # every stage counts tokens
    for stage in ("train_p", "train_c"):
        train_report = json.loads((run_dir / stage / "train_report.json").read_text())
        assert train_report["total_steps"] > 0
        assert not list((run_dir / stage).glob("checkpoint_step*"))  # pruned after export
        curves = tensorboard_scalars(run_dir / stage / "tensorboard")
        assert len(curves["train/loss"]) == train_report["total_steps"]
    AutoModelForCausalLM.from_pretrained(run_dir / "train_c" / "hf_model")
    # The evaluation: the start model, Tuna_p and Tuna on the same tasks, at the report's top.
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert set(results["models"]) == {"start", "tuna_p", "tuna"}
    for model in results["models"].values():
        assert model["tasks"]["alpaca_eval_ranked"]["pairs"] == 48
        assert model["tasks"]["vicuna_qa"]["n"] == 4
    assert sorted(p.name for p in (run_dir / "eval" / "tensorboard").iterdir()) == sorted(
        results["models"]
    )
    report = (run_dir / "report.md").read_text()
    assert report.index("## Evaluation") < report.index("## Summary")
    assert report.index("| start |") < report.index("| tuna_p |") < report.index("| tuna |")
    assert "scripted stand-in" in report  # what stood in for what
    assert all(s in report for s in STAGES)
    assert (run_dir / "report" / "train_c_training.png").exists()
    assert (run_dir / "report" / "evaluation.png").exists()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and _attempts(run_dir) == dict.fromkeys(STAGES, 1)

    again = run_cli(*args)  # nothing changed: every stage skipped, no server started
    assert_ok(again)
    assert "starting embedded server" not in again.stderr
    assert _stage_status(again) == dict.fromkeys(STAGES, "ran")  # as it ended, not "skipped"
    assert _attempts(run_dir) == dict.fromkeys(STAGES, 1)
    assert (run_dir / "report.md").read_text() == report  # a no-op rerun loses no figure

    # A changed stage config re-runs that stage and every stage after it.
    changed = run_cli(*args, "train_c.optim.learning_rate=2e-4")
    assert_ok(changed)
    assert _stage_status(changed) == dict.fromkeys(STAGES, "ran")
    assert "[5/6] train_c: starting" in changed.stderr and "[6/6] eval: starting" in changed.stderr
    assert "[4/6] rank_contextual: finished before, skipped" in changed.stderr


def test_ctrl_c_beside_another_ray_then_ray_job_submit_resumes(tmp_path):
    """Ctrl-C in the teacher stage of a local run -- with another Ray (a local head) running on
    the machine -- prints one line, keeps the parts written so far and records "interrupted";
    the same run, submitted to that head with `ray job submit`, resumes with the missing ids
    only, and the report counts both attempts."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    run_dir = tmp_path / "run"
    overrides = [
        f"run_dir={run_dir}", "variant=tuna_p", "eval=null", "probabilistic.scaling.batch_size=2",
    ]  # fmt: skip
    head, dashboard = _start_head(tmp_path)
    try:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        first = subprocess.Popen(
            [sys.executable, "-m", "tuna_ray", "run", "--config", "jobs/configs/tiny-cpu.yaml",
             *overrides],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        parts = run_dir / "rank_probabilistic" / "parts"
        deadline = time.time() + 600
        while not (parts.exists() and len(list(parts.glob("*.parquet"))) >= 2):
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.time() < deadline, "no part written in time"
            time.sleep(0.5)
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=120)
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
        deadline = time.time() + 600
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
    look for "the" cluster find it there."""
    from tuna_ray.ray_setup import _free_port

    venv_bin = Path(sys.executable).parent  # as with an activated venv: `python` is ours
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    port = _free_port()
    head = subprocess.Popen(
        [str(venv_bin / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={_free_port()}", "--num-cpus=4", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={port}", "--disable-usage-stats",
         # Its job agent's HTTP port: the default (52365) is taken by the test session's own
         # Ray, and a head whose agent cannot bind it answers "No available agent" forever.
         f"--dashboard-agent-listen-port={_free_port()}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    dashboard = f"http://127.0.0.1:{port}"
    from ray.job_submission import JobSubmissionClient

    deadline = time.time() + 180
    while True:
        assert head.poll() is None, "ray start --head exited"
        try:
            JobSubmissionClient(dashboard).list_jobs()
            return head, dashboard
        except Exception:  # noqa: BLE001 -- not up yet
            assert time.time() < deadline, "the head's dashboard did not come up"
            time.sleep(2)


def _submit(client, **job) -> str:
    """Submit once the head's job agent is up (it starts a little after the dashboard)."""
    deadline = time.time() + 120
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(2)


def _stop_head(head: subprocess.Popen) -> None:
    os.killpg(head.pid, signal.SIGKILL)
    head.wait(timeout=30)
