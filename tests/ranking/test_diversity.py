"""The diversity rule of METHOD.md, checked against rouge-score directly."""

from __future__ import annotations

from itertools import combinations

from rouge_score import rouge_scorer

from tuna_ray.engines.base import Sample
from tuna_ray.ranking.diversity import DiversityTracker, pairwise_rouge_l, trial_temperature


def _samples(*texts: str) -> list[Sample]:
    return [Sample(t, [-1.0]) for t in texts]


def test_pairwise_rouge_matches_rouge_score_with_stemming():
    texts = ["The cats are running fast", "the cat runs fast", "a completely different answer"]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    expected = [scorer.score(a, b)["rougeL"].fmeasure for a, b in combinations(texts, 2)]
    assert pairwise_rouge_l(texts) == expected
    assert expected[0] > 0.6  # stemming makes cats/cat and running/runs match


def test_diverse_first_trial_is_kept_and_stops():
    t = DiversityTracker(threshold=0.8, max_trials=3)
    assert t.add_trial(_samples("red apples", "blue sky above", "green grass grows"), 1.0)
    assert (t.trials, t.kept_trial, t.temperatures) == (1, 1, [1.0])
    assert t.max_rouge_l < 0.8


def test_similar_samples_resample_and_the_least_similar_trial_is_kept():
    t = DiversityTracker(threshold=0.8, max_trials=3)
    same = _samples("the same answer", "the same answer", "another one")
    close = _samples("a cat sat", "a cat sat down", "dogs bark loudly")
    worse = _samples("x y z", "x y z", "x y z")
    assert not t.add_trial(same, trial_temperature(1.0, 0, 0.1))
    assert not t.add_trial(close, trial_temperature(1.0, 1, 0.1))
    assert t.add_trial(worse, trial_temperature(1.0, 2, 0.1))  # out of trials
    assert t.temperatures == [1.0, 1.1, 1.2] and t.trials == 3
    expected_means = [sum(pairwise_rouge_l([s.text for s in x])) / 3 for x in (same, close, worse)]
    best = min(range(3), key=lambda i: expected_means[i])
    assert t.kept_trial == best + 1 and t.mean_rouge_l == expected_means[best]
