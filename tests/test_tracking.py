"""TensorBoard event files from the training metrics and the evaluation results, read back."""

from __future__ import annotations

import json

import pytest

from tests.support import tensorboard_scalars
from tuna_ray import tracking


def test_training_metrics_become_scalars_per_step_and_a_rewrite_replaces_them(tmp_path):
    run = tmp_path / "train_p"
    (run / "metrics").mkdir(parents=True)
    rows = [{"step": s, "total_steps": 3, "loss": 1.0 / s, "lr": 1e-5 * s} for s in (1, 2, 3)]
    (run / "metrics" / "steps0000001-0000002.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows[:2])
    )
    # a resumed run logged step 2 again: the last one counts
    again = {**rows[1], "loss": 0.4}
    (run / "metrics" / "steps0000002-0000003.jsonl").write_text(
        json.dumps(again) + "\n" + json.dumps(rows[2]) + "\ncut sh"
    )
    tracking.write_training(str(run))
    tracking.write_training(str(run))  # a rerun: the same points, not twice as many
    scalars = tensorboard_scalars(run / "tensorboard")
    assert set(scalars) == {"train/loss", "train/lr"}
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]
    # float32 on disk
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([1.0, 0.4, 1 / 3], rel=1e-6)


def test_eval_results_one_run_per_model(tmp_path):
    per_model = [
        {"model": {"label": label}, "tasks": {"qa": {"win_rate": rate, "n": 8, "ci": [1, 2]}}}
        for label, rate in (("start", 40.0), ("tuna", 55.0))
    ]
    tracking.write_eval(str(tmp_path), per_model)
    for label, rate in (("start", 40.0), ("tuna", 55.0)):
        scalars = tensorboard_scalars(tmp_path / "tensorboard" / label)
        assert scalars["eval/qa/win_rate"] == [(0, rate)] and scalars["eval/qa/n"] == [(0, 8.0)]
