"""Training on nothing is an error named before Ray starts (not a KeyError from deep inside).

Needs, in ``run_training`` right after ``records = read.records[: cfg.data.limit]``:
``require_records(records, read, cfg.data.path, stage="train")`` (tuna_ray.data.readers).
"""

from __future__ import annotations

import json

import pytest

from tests.support import run_cli


def _train(tmp_path, data, *extra):
    return run_cli(
        "train",
        "--config",
        "jobs/configs/train-tiny-cpu.yaml",
        f"data.path={data}",
        f"run.storage_path={tmp_path / 'runs'}",
        *extra,
    )


@pytest.mark.parametrize("content, why", [("", "holds no records"), ("skipped", "were skipped")])
def test_no_records_to_train_on(tmp_path, content, why):
    data = tmp_path / "ranked.jsonl"
    one_answer = {"id": "a", "instruction": "x", "responses": ["only one"]}
    data.write_text(json.dumps(one_answer) + "\n" if content else "")
    proc = _train(tmp_path, data, "data.on_error=skip")
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("tuna-ray train: error: train: nothing to do: ") and why in line, line
    assert "starting a local Ray" not in proc.stderr
