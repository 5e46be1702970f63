"""Student sampling on the real SmolLM2-135M with the diversity rule, through Ray Data."""

from __future__ import annotations

import json
from statistics import mean

import pyarrow.parquet as pq
import pytest

from tests.support import assert_ok, run_here
from tuna_ray.ranking.diversity import pairwise_rouge_l

pytestmark = pytest.mark.slow


def test_diversity_rule_is_applied_and_recorded(tmp_path, smollm2_path, ray_session):
    out = tmp_path / "out"
    # A low threshold makes most instructions resample, so the trial logic really runs.
    proc = run_here(
        "sample",
        "--config",
        "jobs/configs/sample-smollm2-cpu.yaml",
        "input.limit=6",
        f"output_dir={out}",
        "sampling.max_tokens=16",
        "diversity_threshold=0.3",
    )
    assert_ok(proc)
    records = pq.read_table(out / "candidates.parquet").to_pylist()
    assert len(records) == 6
    assert any(r["trials"] > 1 for r in records)
    for r in records:
        assert 1 <= r["kept_trial"] <= r["trials"] <= 3
        assert r["temperatures"] == pytest.approx([1.0, 1.1, 1.2][: r["trials"]])
        if r["trials"] < 3:
            assert r["max_rouge_l"] < 0.3  # stopped early only because diverse enough
        if len(r["responses"]) == 4:  # no empty sample dropped: recorded values are checkable
            rouge = pairwise_rouge_l(r["responses"])
            assert r["mean_rouge_l"] == pytest.approx(mean(rouge))
            assert r["max_rouge_l"] == pytest.approx(max(rouge))
        assert len(r["logprob_sums"]) == len(r["num_tokens"]) == len(r["responses"])
        assert json.loads(r["generator"])["engine"].startswith("hf:")
    report = json.loads((out / "manifest.json").read_text())
    assert report["counts"]["candidates"] == 6
    assert report["counts"]["trials"] == sum(r["trials"] for r in records)
