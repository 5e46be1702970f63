"""Tests for tuna_ray.train.loss: parity with a slow loop reference, properties, invariances."""

from __future__ import annotations

import doctest
import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tuna_ray.train import loss as loss_module
from tuna_ray.train.loss import (
    LossNormaliser,
    length_normalised_scores,
    pairs_per_gap,
    pairwise_accuracy,
    ranking_loss,
    tuna_loss,
)

settings.register_profile("tuna_loss", max_examples=60, deadline=None)
settings.load_profile("tuna_loss")


# --- slow, obviously-correct reference ------------------------------------------------------


def reference_ranking(scores: list[list[float]], margin: float) -> float:
    """Sum over gaps of the mean hinge over every pair with that gap; rows may differ in length."""
    longest = max(len(row) for row in scores)
    total = 0.0
    for gap in range(1, longest):
        hinges = []
        for row in scores:
            for j in range(len(row) - gap):
                hinges.append(max(0.0, row[j + gap] - row[j] + gap * margin))
        if hinges:
            total += sum(hinges) / len(hinges)
    return total


def reference_loss(
    logprobs: list[list[float]],
    tokens: list[list[int]],
    margin: float,
    mle_weight: float,
    mle_target: str,
) -> tuple[float, float, float]:
    """(total, ranking, mle) for ragged rows of valid candidates only."""
    scores = [
        [lp / max(nt, 1) for lp, nt in zip(lps, nts, strict=True)]
        for lps, nts in zip(logprobs, tokens, strict=True)
    ]
    ranking = reference_ranking(scores, margin)
    last = None if mle_target == "all" else 1
    nll = -sum(lp for row in logprobs for lp in row[:last])
    count = sum(nt for row in tokens for nt in row[:last])
    mle = nll / max(count, 1)
    return mle_weight * mle + ranking, ranking, mle


# --- strategies -------------------------------------------------------------------------------


@dataclass
class Batch:
    logprob_sum: torch.Tensor  # [B, N] float64
    num_tokens: torch.Tensor  # [B, N] int64
    mask: torch.Tensor  # [B, N] bool
    lengths: list[int]

    def ragged(self) -> tuple[list[list[float]], list[list[int]]]:
        logprobs = [self.logprob_sum[b, :n].tolist() for b, n in enumerate(self.lengths)]
        tokens = [self.num_tokens[b, :n].tolist() for b, n in enumerate(self.lengths)]
        return logprobs, tokens


@st.composite
def batches(draw, max_rows: int = 4, max_candidates: int = 5, min_tokens: int = 1) -> Batch:
    rows = draw(st.integers(1, max_rows))
    lengths = draw(st.lists(st.integers(1, max_candidates), min_size=rows, max_size=rows))
    width = max(lengths) + draw(st.integers(0, 1))  # sometimes an all-masked padding column
    cells = rows * width
    logprobs = draw(st.lists(st.floats(-40.0, 0.0), min_size=cells, max_size=cells))
    tokens = draw(st.lists(st.integers(min_tokens, 20), min_size=cells, max_size=cells))
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    return Batch(
        logprob_sum=torch.tensor(logprobs, dtype=torch.float64).reshape(rows, width),
        num_tokens=torch.tensor(tokens, dtype=torch.int64).reshape(rows, width),
        mask=mask,
        lengths=lengths,
    )


@st.composite
def score_batches(draw, max_rows: int = 4, max_candidates: int = 5) -> tuple[torch.Tensor, Batch]:
    batch = draw(batches(max_rows, max_candidates))
    scores = length_normalised_scores(batch.logprob_sum, batch.num_tokens)
    return scores, batch


margins = st.floats(0.0, 1.0)
mle_targets = st.sampled_from(["all", "best"])


# --- parity with the reference ---------------------------------------------------------------


@given(batch=batches(), margin=margins, mle_weight=st.floats(0.0, 2.0), mle_target=mle_targets)
def test_matches_loop_reference(batch, margin, mle_weight, mle_target):
    parts = tuna_loss(
        batch.logprob_sum,
        batch.num_tokens,
        batch.mask,
        margin=margin,
        mle_weight=mle_weight,
        mle_target=mle_target,
    )
    total, ranking, mle = reference_loss(*batch.ragged(), margin, mle_weight, mle_target)
    assert parts.ranking.item() == pytest.approx(ranking, rel=1e-9, abs=1e-9)
    assert parts.mle.item() == pytest.approx(mle, rel=1e-9, abs=1e-9)
    assert parts.total.item() == pytest.approx(total, rel=1e-9, abs=1e-9)


@given(sb=score_batches(), margin=margins)
def test_ranking_loss_matches_reference_gradient(sb, margin):
    """Gradient parity against finite differences of the reference."""
    scores, batch = sb
    scores = scores.clone().requires_grad_()
    (grad,) = torch.autograd.grad(ranking_loss(scores, batch.mask, margin), scores)
    ragged = [scores[b, :n].tolist() for b, n in enumerate(batch.lengths)]
    eps = 1e-6
    for b, n in enumerate(batch.lengths):
        for k in range(n):
            up = [row[:] for row in ragged]
            down = [row[:] for row in ragged]
            up[b][k] += eps
            down[b][k] -= eps
            numeric = (reference_ranking(up, margin) - reference_ranking(down, margin)) / (2 * eps)
            # Skip kinks of the hinge, where the one-sided slopes differ.
            right = (reference_ranking(up, margin) - reference_ranking(ragged, margin)) / eps
            left = (reference_ranking(ragged, margin) - reference_ranking(down, margin)) / eps
            if abs(right - left) < 1e-4:
                assert grad[b, k].item() == pytest.approx(numeric, abs=1e-4)


def test_pairs_per_gap_counts_ragged_rows():
    mask = torch.tensor([[True, True, True], [True, False, False], [True, True, False]])
    assert pairs_per_gap(mask).tolist() == [3, 1]  # gap 1: 2 + 0 + 1; gap 2: 1 + 0 + 0
    assert pairs_per_gap(torch.ones(3, 1, dtype=torch.bool)).tolist() == []


# --- known values -----------------------------------------------------------------------------


def test_known_value_three_candidates():
    # scores s = [-1.0, -0.5, -2.0], margin 0.1, one instruction:
    #   gap 1: (0,1) max(0, -0.5 + 1.0 + 0.1) = 0.6; (1,2) max(0, -2.0 + 0.5 + 0.1) = 0 -> mean 0.3
    #   gap 2: (0,2) max(0, -2.0 + 1.0 + 0.2) = 0                                         -> mean 0
    #   L_rank = 0.3
    scores = torch.tensor([[-1.0, -0.5, -2.0]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    assert ranking_loss(scores, mask, margin=0.1).item() == pytest.approx(0.3)

    # Same scores from logprob sums / token counts [-2/2, -1/2, -6/3]:
    #   MLE "all"  = 9 / 7  -> total = 9/7 + 0.3;   MLE "best" = 2 / 2 = 1 -> total = 1.3
    logprob_sum = torch.tensor([[-2.0, -1.0, -6.0]], dtype=torch.float64)
    num_tokens = torch.tensor([[2, 2, 3]])
    parts = tuna_loss(logprob_sum, num_tokens, mask)
    assert parts.ranking.item() == pytest.approx(0.3)
    assert parts.mle.item() == pytest.approx(9 / 7)
    assert parts.total.item() == pytest.approx(9 / 7 + 0.3)
    best = tuna_loss(logprob_sum, num_tokens, mask, mle_target="best")
    assert best.total.item() == pytest.approx(1.3)
    pure = tuna_loss(logprob_sum, num_tokens, mask, mle_weight=0.0)
    assert pure.total.item() == pytest.approx(0.3)


def test_known_gradient_two_candidates():
    # One violated pair, count 1: L = s_1 - s_0 + m, so dL/ds_0 = -1 and dL/ds_1 = +1.
    scores = torch.tensor([[-1.0, -0.5]], dtype=torch.float64, requires_grad=True)
    ranking_loss(scores, torch.ones(1, 2, dtype=torch.bool)).backward()
    assert scores.grad.tolist() == [[-1.0, 1.0]]


def test_sft_has_no_ranking_term():
    logprob_sum = torch.tensor([[-3.0], [-5.0]])
    num_tokens = torch.tensor([[3], [2]])
    parts = tuna_loss(logprob_sum, num_tokens, torch.ones(2, 1, dtype=torch.bool))
    assert parts.ranking.item() == 0.0
    assert parts.total.item() == pytest.approx(8 / 5)


def test_pairwise_accuracy_hand_checked():
    full = torch.ones(1, 3, dtype=torch.bool)
    # (0,1): 3 > 1 right; (0,2): 3 > 2 right; (1,2): 1 > 2 wrong.
    right, total = pairwise_accuracy(torch.tensor([[3.0, 1.0, 2.0]]), full)
    assert (right.item(), total.item()) == (2, 3)
    # Only (0,1) is a valid pair; the masked 9.0 would otherwise break the order.
    right, total = pairwise_accuracy(
        torch.tensor([[3.0, 1.0, 9.0]]), torch.tensor([[1, 1, 0]]).bool()
    )
    assert (right.item(), total.item()) == (1, 1)
    # Ties are not right; counts add across rows.
    scores = torch.tensor([[1.0, 1.0, 0.0], [2.0, 5.0, float("nan")]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    right, total = pairwise_accuracy(scores, mask)
    assert (right.item(), total.item()) == (2, 4)  # row 0: (0,2), (1,2); row 1: none of 1


# --- properties -------------------------------------------------------------------------------


@given(batch=batches(), data=st.data())
def test_swapping_tied_candidates_keeps_loss(batch, data):
    """Only scores enter the ranking term and MLE "all" is order-free, so equal scores may swap."""
    row = data.draw(st.integers(0, len(batch.lengths) - 1))
    assume(batch.lengths[row] >= 2)
    j, k = sorted(
        data.draw(
            st.lists(st.integers(0, batch.lengths[row] - 1), min_size=2, max_size=2, unique=True)
        )
    )
    scale = data.draw(st.sampled_from([2, 4]))  # powers of two keep the scores bit-equal
    logprob_sum, num_tokens = batch.logprob_sum.clone(), batch.num_tokens.clone()
    logprob_sum[row, k] = logprob_sum[row, j] * scale
    num_tokens[row, k] = num_tokens[row, j] * scale
    before = tuna_loss(logprob_sum, num_tokens, batch.mask)
    swap = torch.arange(logprob_sum.shape[1])
    swap[[j, k]] = swap[[k, j]]
    logprob_sum[row] = logprob_sum[row, swap]
    num_tokens[row] = num_tokens[row, swap]
    after = tuna_loss(logprob_sum, num_tokens, batch.mask)
    assert after.total.item() == pytest.approx(before.total.item(), rel=1e-12, abs=1e-12)
    assert after.ranking.item() == pytest.approx(before.ranking.item(), rel=1e-12, abs=1e-12)


@given(batch=batches(), data=st.data())
def test_permuting_rows_keeps_loss(batch, data):
    order = torch.tensor(data.draw(st.permutations(range(len(batch.lengths)))))
    before = tuna_loss(batch.logprob_sum, batch.num_tokens, batch.mask).total
    after = tuna_loss(batch.logprob_sum[order], batch.num_tokens[order], batch.mask[order]).total
    assert after.item() == pytest.approx(before.item(), rel=1e-12, abs=1e-12)


@given(sb=score_batches(), m1=margins, m2=margins)
def test_loss_non_decreasing_in_margin(sb, m1, m2):
    scores, batch = sb
    low, high = sorted((m1, m2))
    assert ranking_loss(scores, batch.mask, low) <= ranking_loss(scores, batch.mask, high) + 1e-12


@given(sb=score_batches())
def test_large_margin_makes_every_multi_candidate_batch_lossy(sb):
    """Counterpart of the monotonicity test: a margin beyond any score spread is always violated."""
    scores, batch = sb
    assume(max(batch.lengths) >= 2)
    assert ranking_loss(scores, batch.mask, margin=100.0) > 0


@given(batch=batches(min_tokens=0), data=st.data(), mle_target=mle_targets)
def test_masked_slots_have_no_effect(batch, data, mle_target):
    logprob_sum = batch.logprob_sum.clone().requires_grad_()
    clean = tuna_loss(logprob_sum, batch.num_tokens, batch.mask, mle_target=mle_target)
    (clean_grad,) = torch.autograd.grad(clean.total, logprob_sum)

    junk = data.draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e30, -1e30]))
    junk_tokens = data.draw(st.sampled_from([0, 1, 10**6]))
    dirty_lp = batch.logprob_sum.masked_fill(~batch.mask, junk).requires_grad_()
    dirty_nt = batch.num_tokens.masked_fill(~batch.mask, junk_tokens)
    dirty = tuna_loss(dirty_lp, dirty_nt, batch.mask, mle_target=mle_target)
    (dirty_grad,) = torch.autograd.grad(dirty.total, dirty_lp)

    assert torch.equal(dirty.total, clean.total)
    assert torch.equal(dirty_grad, clean_grad)
    assert torch.all(dirty_grad[~batch.mask] == 0)


@given(sb=score_batches())
def test_masked_scores_have_no_effect_on_ranking_loss(sb):
    scores, batch = sb
    dirty = scores.masked_fill(~batch.mask, math.nan).requires_grad_()
    value = ranking_loss(dirty, batch.mask)
    (grad,) = torch.autograd.grad(value, dirty)
    assert torch.equal(value, ranking_loss(scores, batch.mask))
    assert torch.isfinite(grad).all()
    assert torch.all(grad[~batch.mask] == 0)


@given(sb=score_batches(), margin=margins)
def test_gradient_signs(sb, margin):
    """Candidate 0 is only ever the better one of a pair, the last valid one only the worse."""
    scores, batch = sb
    scores = scores.clone().requires_grad_()
    (grad,) = torch.autograd.grad(ranking_loss(scores, batch.mask, margin), scores)
    s = scores.detach()
    for b, n in enumerate(batch.lengths):
        last = n - 1
        assert grad[b, 0] <= 0
        assert grad[b, last] >= 0
        if any(s[b, k] - s[b, 0] + k * margin > 1e-9 for k in range(1, n)):
            assert grad[b, 0] < 0
        if any(s[b, last] - s[b, j] + (last - j) * margin > 1e-9 for j in range(last)):
            assert grad[b, last] > 0


@given(
    steps=st.lists(st.floats(0.0, 2.0), min_size=1, max_size=5),
    start=st.floats(-5.0, 0.0),
    margin=st.floats(0.0, 0.5),
)
def test_ranking_zero_iff_consecutive_gaps_exceed_margin(steps, start, margin):
    assume(all(abs(step - margin) > 1e-6 for step in steps))
    scores = torch.tensor(
        [[start - sum(steps[:k]) for k in range(len(steps) + 1)]], dtype=torch.float64
    )
    value = ranking_loss(scores, torch.ones_like(scores, dtype=torch.bool), margin).item()
    if all(step > margin for step in steps):
        assert value == 0.0
    else:
        assert value > 0.0


def test_zero_token_candidate_is_finite():
    logprob_sum = torch.tensor([[-2.0, 0.0, -3.0], [-1.0, 0.0, 0.0]], requires_grad=True)
    num_tokens = torch.tensor([[2, 0, 3], [0, 0, 0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    assert length_normalised_scores(logprob_sum, num_tokens)[0, 1].item() == 0.0
    parts = tuna_loss(logprob_sum, num_tokens, mask)
    parts.total.backward()
    assert torch.isfinite(parts.total) and torch.isfinite(logprob_sum.grad).all()
    assert parts.mle.item() == pytest.approx(6 / 5)  # -(-2 - 3 - 1) / (2 + 3)


# --- micro-batch split invariance ------------------------------------------------------------


@given(
    batch=batches(max_rows=6),
    data=st.data(),
    mle_target=mle_targets,
    mle_weight=st.floats(0.0, 2.0),
)
def test_micro_batch_split_invariance(batch, data, mle_target, mle_weight):
    rows = len(batch.lengths)
    kwargs = {"mle_target": mle_target, "mle_weight": mle_weight, "margin": 0.1}
    full_lp = batch.logprob_sum.clone().requires_grad_()
    full = tuna_loss(full_lp, batch.num_tokens, batch.mask, **kwargs)
    (full_grad,) = torch.autograd.grad(full.total, full_lp)

    parts = data.draw(st.integers(1, rows))
    assignment = data.draw(st.lists(st.integers(0, parts - 1), min_size=rows, max_size=rows))
    global_norm = LossNormaliser.from_batch(batch.mask, batch.num_tokens, mle_target)

    split_lp = batch.logprob_sum.clone().requires_grad_()
    total = torch.zeros((), dtype=torch.float64)
    local_norms = []
    for part in range(parts):
        idx = torch.tensor([r for r in range(rows) if assignment[r] == part], dtype=torch.long)
        if idx.numel() == 0:
            continue
        width = max(batch.lengths[r] for r in idx.tolist())
        pad = data.draw(st.integers(0, 2))  # micro-batches pad to their own N
        lp = torch.nn.functional.pad(split_lp[idx, :width], (0, pad), value=-7.0)
        nt = torch.nn.functional.pad(batch.num_tokens[idx, :width], (0, pad), value=3)
        mask = torch.nn.functional.pad(batch.mask[idx, :width], (0, pad), value=False)
        total = total + tuna_loss(lp, nt, mask, normaliser=global_norm, **kwargs).total
        local_norms.append(LossNormaliser.from_batch(mask, nt, mle_target))
    (split_grad,) = torch.autograd.grad(total, split_lp)

    torch.testing.assert_close(total, full.total, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(split_grad, full_grad, rtol=1e-10, atol=1e-10)

    merged = LossNormaliser.sum(local_norms)
    gaps = max(merged.pairs_per_gap.numel(), global_norm.pairs_per_gap.numel())
    assert torch.equal(merged.padded(gaps).pairs_per_gap, global_norm.padded(gaps).pairs_per_gap)
    assert torch.equal(merged.mle_tokens, global_norm.mle_tokens)


def test_split_without_normaliser_differs():
    """The normaliser is what makes the split exact: local denominators give another value."""
    logprob_sum = torch.tensor([[-1.0, -0.5, -2.0], [-3.0, -1.0, 0.0]], dtype=torch.float64)
    num_tokens = torch.tensor([[1, 1, 1], [1, 1, 1]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    full = tuna_loss(logprob_sum, num_tokens, mask).total
    norm = LossNormaliser.from_batch(mask, num_tokens)
    exact = sum(
        tuna_loss(logprob_sum[[r]], num_tokens[[r]], mask[[r]], normaliser=norm).total
        for r in range(2)
    )
    naive = sum(tuna_loss(logprob_sum[[r]], num_tokens[[r]], mask[[r]]).total for r in range(2))
    assert exact.item() == pytest.approx(full.item())
    assert naive.item() != pytest.approx(full.item())


# --- validation -------------------------------------------------------------------------------


def test_pair_counts_must_cover_local_pairs():
    scores = torch.zeros(1, 3)
    mask = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="gap 2"):
        ranking_loss(scores, mask, pair_counts=torch.tensor([5]))  # gap 2 missing
    with pytest.raises(ValueError, match="gap 1"):
        ranking_loss(scores, mask, pair_counts=torch.tensor([1, 1]))  # 1 < 2 local gap-1 pairs
    longer = ranking_loss(scores, mask, pair_counts=torch.tensor([4, 2, 9]))
    assert longer.item() == pytest.approx(2 * 0.1 / 4 + 0.2 / 2)
    # A missing gap is fine when this batch has no pairs with that gap.
    short_rows = torch.tensor([[True, True, False]])
    assert ranking_loss(scores, short_rows, pair_counts=torch.tensor([2])).item() == pytest.approx(
        0.1 / 2
    )


def test_invalid_inputs_raise():
    lp, nt = torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="first"):
        tuna_loss(lp, nt, torch.tensor([[False, True]]))
    with pytest.raises(ValueError, match="mle_target"):
        tuna_loss(lp, nt, torch.ones(1, 2, dtype=torch.bool), mle_target="worst")
    too_small = LossNormaliser(torch.tensor([1]), torch.tensor(1))
    with pytest.raises(ValueError, match="MLE tokens"):
        tuna_loss(lp, nt, torch.ones(1, 2, dtype=torch.bool), normaliser=too_small)
    with pytest.raises(ValueError):
        LossNormaliser.sum([])


def test_docstring_examples():
    result = doctest.testmod(loss_module)
    assert result.attempted > 0
    assert result.failed == 0
