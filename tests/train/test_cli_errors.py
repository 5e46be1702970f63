"""Bad input stops the train command early with a message naming file, line and field."""

from __future__ import annotations

import json

from tests.support import run_cli


def test_bad_record_names_file_line_and_field(tmp_path):
    data = tmp_path / "ranked.jsonl"
    good = {"id": "a", "instruction": "x", "responses": ["one", "two"]}
    bad = {"id": "b", "instruction": "y", "responses": ["only one"]}
    data.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    proc = run_cli(
        "train",
        "--config",
        "jobs/configs/train-tiny-cpu.yaml",
        f"data.path={data}",
        f"run.storage_path={tmp_path}",
    )
    assert proc.returncode == 2
    assert f"{data} line 2, field 'responses'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_config_key_is_named(tmp_path):
    proc = run_cli(
        "train",
        "--config",
        "jobs/configs/train-tiny-cpu.yaml",
        "train.learning_rate=1",
    )
    assert proc.returncode == 2 and "train.learning_rate" in proc.stderr
