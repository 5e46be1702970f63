"""Ranking agreement, pure core: does the model's likelihood follow a given ranking?

Stage: eval (no Ray, no model here; the scores come from tuna_ray.train.evaluate.
score_candidates, the length-normalised log-likelihood the Tuna loss ranks by: the mean log-prob
of the response tokens, EOS included, after the prompt in the model's template).

For a ranked record with answers r_0 (best) .. r_{N-1} there are N(N-1)/2 ordered pairs
(j < k, r_j given as better). Over all pairs of all records:

- ``agreement`` = (pairs with s_j > s_k + 0.5 x pairs with s_j = s_k) / pairs, s the model's
  score: the property Tuna trains (1.0: the model's likelihood orders every pair as given;
  0.5: chance). Exact score ties essentially only happen for identical answers.
- ``length_baseline`` = the same with s = the answer's length in characters ("the longer
  answer is better"; equal lengths count half): what a length-only ranker achieves on this
  set. A model whose agreement does not beat it has learned nothing beyond length.
- ``pairs``: the number of ordered pairs; ``records``: ranked records scored.

The bootstrap interval resamples records (a record's pairs are not independent).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from tuna_ray.eval.stats import bootstrap_ci


def pair_agreement(scores: Sequence[float]) -> tuple[float, int]:
    """(agreeing pairs, ties counted half; number of pairs) for scores in given order.

    >>> pair_agreement([3.0, 1.0, 2.0])
    (2.0, 3)
    >>> pair_agreement([1.0, 1.0])
    (0.5, 1)
    """
    agree, pairs = 0.0, 0
    for j in range(len(scores)):
        for k in range(j + 1, len(scores)):
            pairs += 1
            if scores[j] > scores[k]:
                agree += 1.0
            elif scores[j] == scores[k]:
                agree += 0.5
    return agree, pairs


def score_ranking_agreement(
    scores: Sequence[Sequence[float]],
    responses: Sequence[Sequence[str]],
    *,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """``agreement``, ``pairs``, ``length_baseline`` (module docstring), ``records``, and the
    bootstrap intervals ``ci`` (agreement) and ``length_baseline_ci``."""
    if len(scores) != len(responses):
        raise ValueError(f"{len(scores)} score lists for {len(responses)} records")
    model, length, counts = [], [], []
    for s, r in zip(scores, responses):
        if len(s) != len(r):
            raise ValueError(f"{len(s)} scores for {len(r)} responses")
        agree, pairs = pair_agreement(list(s))
        model.append(agree)
        length.append(pair_agreement([len(x) for x in r])[0])
        counts.append(pairs)
    pairs = sum(counts)
    boot = {"resamples": resamples, "seed": seed, "level": level}
    agreement = sum(model) / pairs if pairs else math.nan
    return {
        "metric": "agreement",
        "value": agreement,
        "agreement": agreement,
        "pairs": pairs,
        "length_baseline": sum(length) / pairs if pairs else math.nan,
        "records": len(scores),
        "ci": list(bootstrap_ci(model, counts, **boot)) if pairs else [math.nan, math.nan],
        "length_baseline_ci": (
            list(bootstrap_ci(length, counts, **boot)) if pairs else [math.nan, math.nan]
        ),
    }
