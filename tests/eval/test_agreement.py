"""Ranking agreement core (tuna_ray/eval/agreement.py), by hand."""

from __future__ import annotations

import pytest

from tuna_ray.eval.agreement import pair_agreement, score_ranking_agreement


def test_pairs_ties_half():
    assert pair_agreement([-0.5, -1.0, -2.0]) == (3.0, 3)  # follows the order
    assert pair_agreement([-2.0, -1.0, -0.5]) == (0.0, 3)  # reversed
    # (0,1) tie; (0,2), (1,2) agree; every pair with the last (-0.1, the best score) disagrees.
    assert pair_agreement([-1.0, -1.0, -3.0, -0.1]) == (0.5 + 1 + 1, 6)
    assert pair_agreement([1.0]) == (0.0, 0)


def test_agreement_and_length_baseline_by_hand():
    scores = [[-0.5, -1.0, -2.0], [-1.0, -0.2]]
    responses = [["long answer", "mid", "x"], ["same", "sAme"]]
    result = score_ranking_agreement(scores, responses, resamples=200)
    # Model: 3 of 3, then 0 of 1 -> 3/4. Length: 3 of 3 (longer first), then a tie -> 3.5/4.
    assert result["agreement"] == pytest.approx(3 / 4)
    assert result["length_baseline"] == pytest.approx(3.5 / 4)
    assert (result["pairs"], result["records"]) == (4, 2)
    assert isinstance(result["pairs"], int)
    assert result["ci"][0] <= 0.75 <= result["ci"][1]
    with pytest.raises(ValueError):
        score_ranking_agreement([[0.0]], [["a", "b"]])
