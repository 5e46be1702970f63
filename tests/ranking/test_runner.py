"""The generation stages' driver (ranking/runner.py): nothing in, or nothing out, is an error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import assert_ok, run_cli, run_here

pytestmark = pytest.mark.slow


def _rank(data: Path, out: Path, base_url: str = "http://127.0.0.1:9/v1", *extra: str, run=run_cli):
    return run(
        "rank-probabilistic",
        "--config",
        "jobs/configs/rank-probabilistic-tiny.yaml",
        f"input.path={data}",
        f"output_dir={out}",
        f"engine.base_url={base_url}",
        "engine.model=fixed",
        *extra,
    )


def _last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


def test_empty_input_fails_before_any_work(tmp_path):
    data = tmp_path / "none.json"
    data.write_text("[]")
    proc = _rank(data, tmp_path / "out")
    assert proc.returncode == 2
    assert _last_line(proc) == (
        f"tuna-ray rank-probabilistic: error: rank_probabilistic: nothing to do: {data} holds "
        "no records"
    )
    assert "starting a local Ray" not in proc.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_fully_skipped_input_names_the_counts(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"id": "a"}\n{"id": "b", "instruction": " "}\nnot json\n')
    proc = _rank(data, tmp_path / "out", "http://127.0.0.1:9/v1", "input.on_error=skip")
    assert proc.returncode == 2
    line = _last_line(proc)
    assert line.startswith(
        f"tuna-ray rank-probabilistic: error: rank_probabilistic: nothing to do: all 3 records "
        f"of {data} were skipped ("
    ), line
    assert "missing_field" in line and "bad_json" in line


def test_a_stage_that_produces_nothing_fails_and_is_not_finished(tmp_path, ray_session):
    from tuna_ray.serve.local import start_local_server

    data = tmp_path / "four.jsonl"
    data.write_text(
        "".join(json.dumps({"id": f"i{k}", "instruction": f"Q{k}?"}) + "\n" for k in range(4))
    )
    out = tmp_path / "out"
    # Every failure allowed (the default bound would stop it as TooManyFailuresError first):
    # still, a stage with no result is no finished stage.
    args = ("engine.max_retries=0", "engine.cache_dir=null", "max_failure_share=1.0")
    with start_local_server(mode="fixed", fault_rate=1.0, fault_kinds=["500"]) as server:
        proc = _rank(data, out, server.base_url, *args, run=run_here)
        assert proc.returncode == 2
        assert _last_line(proc) == (
            "tuna-ray rank-probabilistic: error: rank_probabilistic: produced no records from 4 "
            "input records (4 failed: {'http 500': 4}; the rest excluded); see failures.jsonl"
        )
        assert len((out / "failures.jsonl").read_text().splitlines()) == 4
        assert not (out / "manifest.json").exists()  # not finished: a rerun tries again
        server.set_faults(0.0)
        assert_ok(_rank(data, out, server.base_url, *args, run=run_here))
    assert json.loads((out / "manifest.json").read_text())["counts"]["ranked"] == 4


def test_pipeline_stops_at_the_stage_and_names_it(tmp_path):
    data = tmp_path / "none.jsonl"
    data.write_text("\n")
    run_dir = tmp_path / "run"
    proc = run_cli(
        "run",
        "--config",
        "jobs/configs/tiny-cpu.yaml",
        f"run_dir={run_dir}",
        f"instructions.path={data}",
        "variant=tuna_c",  # its first stage needs no embedded server: a quicker failure
    )
    assert proc.returncode == 2
    assert _last_line(proc) == (
        "tuna-ray run: error: stopped at stage sample (1/4): sample: "
        f"nothing to do: {data} holds no records"
    )
    assert "sample failed, the pipeline stops here" in proc.stderr
    assert not (run_dir / "rank_contextual").exists()
