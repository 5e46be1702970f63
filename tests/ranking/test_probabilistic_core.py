"""Probabilistic ranking core: cleaning rules, ordering by mean token log-prob, stable ties."""

from __future__ import annotations

import json

from tuna_ray.engines.base import Sample, SamplingParams, Scored
from tuna_ray.ranking.probabilistic import (
    clean_samples,
    rank_by_teacher_logprob,
    reference_candidate,
)


def test_clean_drops_empty_duplicate_and_tokenless_samples_with_counts():
    samples = [
        Sample("A cat.", [-1.0, -2.0]),
        Sample("  ", [-0.1]),
        Sample(" A cat. ", [-0.5]),
        Sample("A dog.", []),
        Sample("A bird.", [-3.0]),
    ]
    seen = {"A bird."}  # kept in an earlier round
    out = clean_samples(samples, seen)
    assert [c.text for c in out.kept] == ["A cat."]
    assert out.dropped == {"empty": 1, "duplicate": 2, "no_tokens": 1}
    assert "A cat." in seen


def test_rank_orders_by_mean_not_sum_and_keeps_ties_in_sampling_order():
    samples = [
        Sample("long", [-1.0] * 10),
        Sample("short", [-2.0]),
        Sample("tie", [-0.5, -1.5]),
        Sample("best", [-0.1, -0.1]),
    ]
    cands = clean_samples(samples).kept
    ref = reference_candidate("ref answer", Scored(logprob_sum=-3.0, num_tokens=2))
    record = {"id": "x", "instruction": "Do it", "input": "", "source": "t"}
    ranked = rank_by_teacher_logprob(
        record, "P", cands + [ref], generator="hf:m", params=SamplingParams(n=4, seed=3)
    )
    # means: long -1.0, short -2.0, tie -1.0, best -0.1, ref -1.5
    assert ranked["responses"] == ["best", "long", "tie", "ref answer", "short"]
    assert ranked["scores"] == [-0.1, -1.0, -1.0, -1.5, -2.0]
    assert ranked["origins"] == ["sample", "sample", "sample", "reference", "sample"]
    assert ranked["num_tokens"] == [2, 10, 2, 2, 1]
    assert json.loads(ranked["generator"])["engine"] == "hf:m"
    assert json.loads(ranked["generator"])["seed"] == 3
    assert ranked["ranking"] == "probabilistic" and ranked["prompt"] == "P"


def test_reference_without_tokens_is_not_a_candidate():
    assert reference_candidate("text", Scored(0.0, 0)) is None
    assert reference_candidate("   ", Scored(-1.0, 2)) is None
