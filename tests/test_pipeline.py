"""The whole Tuna schedule on tiny random-weight models, through the CLI and `ray job submit`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.support import REPO, assert_ok, run_cli

pytestmark = pytest.mark.slow
STAGES = ["rank_probabilistic", "train_p", "sample", "rank_contextual", "train_c"]


def _stage_status(proc) -> dict[str, str]:
    start = proc.stdout.index('{\n  "run_dir"')  # the CLI's summary, amid Ray's output
    return json.JSONDecoder().raw_decode(proc.stdout[start:])[0]["stages"]


def test_whole_schedule_then_rerun_skips_and_redoes_only_what_changed(tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    args = ("run", "--config", "jobs/configs/tiny-cpu.yaml", f"run_dir={run_dir}")
    first = run_cli(*args)
    assert_ok(first)
    assert _stage_status(first) == dict.fromkeys(STAGES, "ran")
    for stage in ("rank_probabilistic", "sample", "rank_contextual"):
        manifest = json.loads((run_dir / stage / "manifest.json").read_text())
        assert manifest["counts"]["failed"] == 0 and manifest["input"]["used"] == 16
    for stage in ("train_p", "train_c"):
        assert json.loads((run_dir / stage / "train_report.json").read_text())["total_steps"] > 0
    AutoModelForCausalLM.from_pretrained(run_dir / "train_c" / "hf_model")
    report = (run_dir / "report.md").read_text()
    assert (
        all(s in report for s in STAGES) and (run_dir / "report" / "train_c_training.png").exists()
    )

    again = run_cli(*args)  # nothing changed: every stage skipped, no server started
    assert_ok(again)
    assert _stage_status(again) == dict.fromkeys(STAGES, "skipped")
    assert "starting embedded server" not in again.stderr

    shutil.rmtree(run_dir / "train_c")  # the last stage's output is gone: only it is redone
    redo = run_cli(*args)
    assert_ok(redo)
    assert _stage_status(redo) == {**dict.fromkeys(STAGES[:-1], "skipped"), "train_c": "ran"}

    # A changed stage config re-runs that stage and every stage after it.
    changed = run_cli(*args, "contextual.shuffle=true")
    assert_ok(changed)
    assert _stage_status(changed) == {
        "rank_probabilistic": "skipped",
        "train_p": "skipped",
        "sample": "skipped",
        "rank_contextual": "ran",
        "train_c": "ran",
    }


def test_ray_job_submit_runs_the_pipeline_on_a_local_head(tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    venv_bin = Path(sys.executable).parent  # as with an activated venv: `python` is ours
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    ray_bin = str(venv_bin / "ray")
    ray_tmp = tempfile.mkdtemp(prefix="tr-", dir="/tmp")  # Unix socket paths must stay short
    start = subprocess.run(
        [
            ray_bin,
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=4",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            "--dashboard-port=8265",
            "--disable-usage-stats",
            f"--temp-dir={ray_tmp}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        client = JobSubmissionClient("http://127.0.0.1:8265")
        run_dir = tmp_path / "run"
        job = client.submit_job(
            entrypoint=f"python jobs/tuna.py --config jobs/configs/tiny-cpu.yaml variant=tuna_p "
            f"run_dir={run_dir}",
            runtime_env={
                "working_dir": str(REPO),
                "excludes": [".venv", "runs", ".git"],
                "env_vars": {"RAY_AUTH_MODE": "disabled"},
            },
        )
        deadline = time.time() + 420
        while not (status := client.get_job_status(job)).is_terminal():
            assert time.time() < deadline, "job did not finish in time"
            time.sleep(2)
        logs = client.get_job_logs(job)
        assert status == JobStatus.SUCCEEDED, logs[-3000:]
        assert (run_dir / "train_p" / "hf_model" / "model.safetensors").exists()
        assert (
            json.loads((run_dir / "rank_probabilistic" / "manifest.json").read_text())["counts"][
                "ranked"
            ]
            == 16
        )
    finally:
        subprocess.run(
            [ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120, check=False
        )
        shutil.rmtree(ray_tmp, ignore_errors=True)
