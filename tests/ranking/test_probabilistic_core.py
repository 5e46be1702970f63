"""Probabilistic ranking core: cleaning rules, ordering by mean token log-prob, stable ties."""

from __future__ import annotations

import json

from tuna_ray.engines.base import EngineError, Sample, SamplingParams, Scored
from tuna_ray.ranking.probabilistic import (
    TeacherCandidates,
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
    assert json.loads(ranked["generator"])["scoring"] == "sampled"
    assert ranked["ranking"] == "probabilistic" and ranked["prompt"] == "P"


def test_reference_without_tokens_is_not_a_candidate():
    assert reference_candidate("text", Scored(0.0, 0)) is None
    assert reference_candidate("   ", Scored(-1.0, 2)) is None


def test_teacher_candidates_collect_replacements_and_fail_with_the_engine_reason():
    state = TeacherCandidates(want=3)
    state.add([Sample("A", [-1.0]), Sample("A", [-2.0]), Sample(" ", [-1.0])])
    assert state.missing == 2 and state.dropped == {"duplicate": 1, "empty": 1}
    state.add([Sample("B", [-0.5]), Sample("A ", [-0.1])], replacing=2)  # "A " is "A" again
    assert [c.text for c in state.kept] == ["A", "B"] and state.resampled == 2
    assert state.missing == 1
    state.add(EngineError("http 500"), replacing=1)
    assert state.missing == 0 and state.outcome(2) == (None, "http 500")
    too_few = TeacherCandidates(want=4)
    too_few.add([Sample("only", [-1.0])])
    assert "too few usable samples: 1 < 2" in too_few.outcome(2)[1]


def test_rescoring_scores_samples_and_reference_the_same_way():
    """Under echo scoring every candidate's score is the teacher's re-reading, reference too."""
    state = TeacherCandidates(want=2)
    state.add([Sample("x y", [-9.0, -9.0]), Sample("z", [-9.0])])  # sampled log-probs
    assert state.texts_to_score("  ") == ["x y", "z"]  # a blank reference is not a candidate
    assert state.texts_to_score("ref") == ["x y", "z", "ref"]
    state.rescore("ref", [Scored(-1.0, 2), Scored(-3.0, 1), Scored(-4.0, 2)])
    candidates, reason = state.outcome(2)
    assert reason is None
    assert [(c.text, c.score, c.origin) for c in candidates] == [
        ("x y", -0.5, "sample"),
        ("z", -3.0, "sample"),
        ("ref", -2.0, "reference"),
    ]
    failed = TeacherCandidates(want=1)
    failed.add([Sample("x", [-1.0])])
    failed.rescore(None, EngineError("timeout"))
    assert failed.outcome(1) == (None, "scoring: timeout")
    short = TeacherCandidates(want=1)
    short.add([Sample("x", [-1.0])])
    short.rescore("ref", [Scored(-1.0, 1)])  # one score for two texts: never misattributed
    assert short.outcome(1)[1].startswith("scoring:")
