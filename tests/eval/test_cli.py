"""``tuna-ray eval`` end to end in a fresh process: the shipped ranking-agreement config on the
tiny model, the result file's contract, a free rerun, and a clear error for a bad config."""

from __future__ import annotations

import json

import pytest

from tests.support import assert_ok, run_cli

pytestmark = pytest.mark.slow

CONFIG = "jobs/configs/eval-ranking-agreement-cpu.yaml"


def test_eval_cli_ranking_agreement_contract_and_cached_rerun(
    tmp_path, tiny_model_path, ray_session, monkeypatch
):
    import ray

    # The command joins the session's Ray, as inside `ray job submit` (RAY_ADDRESS set).
    monkeypatch.setenv("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    out = tmp_path / "out"
    args = (
        "eval",
        "--config",
        CONFIG,
        f"model.name_or_path={tiny_model_path}",
        f"output_dir={out}",
    )
    assert_ok(run_cli(*args))
    results = json.loads((out / "results.json").read_text())
    task = results["tasks"]["alpaca_eval_ranked_64"]
    # The contract: {"tasks": {NAME: {"agreement": float, "pairs": int, "length_baseline": float}}}
    assert isinstance(task["agreement"], float) and 0.0 <= task["agreement"] <= 1.0
    assert isinstance(task["pairs"], int) and task["pairs"] == 64 * 3  # 3 answers per record
    assert isinstance(task["length_baseline"], float) and 0.0 <= task["length_baseline"] <= 1.0
    assert task["records"] == 64 and task["failed"] == 0
    assert results["model"]["template"] == "chat"
    print(
        f"tiny model: agreement {task['agreement']:.3f} {task['ci']}, length baseline "
        f"{task['length_baseline']:.3f}, {task['pairs']} pairs"
    )

    again = run_cli(*args)
    assert_ok(again)
    assert json.loads(again.stdout)["tasks"]["alpaca_eval_ranked_64"]["cached"] is True
    assert "Connecting to existing Ray cluster" not in again.stderr  # nothing to compute
    assert json.loads((out / "results.json").read_text())["tasks"]["alpaca_eval_ranked_64"][
        "agreement"
    ] == pytest.approx(task["agreement"])


def test_eval_cli_rejects_a_bad_config_clearly(tmp_path, capsys):
    from tuna_ray.cli import main

    assert main(["eval", "--config", CONFIG, "model.tempalte=chat", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "tuna-ray eval: error" in err and "tempalte" in err
    assert not any(tmp_path.iterdir())  # rejected before anything was written
