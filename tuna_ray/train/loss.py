"""Tuna's training loss: a length-normalised ranking loss plus token-averaged MLE.

Each instruction has candidates sorted best-first, k = 0..N-1. The student scores candidate k by
its length-normalised log-likelihood (EOS included in the tokens)::

    s_k = logprob_sum_k / max(num_tokens_k, 1)

The ranking loss sums, over gaps i = 1..N-1, the mean hinge over all gap-i pairs of the batch
(the reference code's one ``MarginRankingLoss`` per gap, summed over gaps)::

    L_rank = sum_{i=1}^{N-1} (1 / C_i) * sum_{b, j} max(0, s_{b,j+i} - s_{b,j} + i*m)

where (b, j) runs over the C_i pairs with both (b, j) and (b, j+i) valid; a gap without pairs
adds 0. The MLE term is the token-averaged negative log-likelihood over the MLE candidates M:
every valid candidate ("all", the reference code's choice) or only the best one of each
instruction ("best")::

    L_MLE = - sum_{k in M} logprob_sum_k / sum_{k in M} num_tokens_k
    L     = lambda * L_MLE + L_rank            (m = 0.1, lambda = 1.0 by default)

Rows may hold different numbers of candidates: ``mask`` [B, N] marks the valid ones, which come
first in each row, at least one per row. Whatever sits in masked slots (even NaN or inf) never
reaches the loss or its gradients.

Both terms are ratios of batch sums, so a micro-batch that divides by its own counts does not
add up to the global batch's loss. A :class:`LossNormaliser` built for the global batch (one
per micro-batch, combined with ``LossNormaliser.sum`` and all-reduced across ranks) supplies the
global denominators; then the micro-batch losses sum exactly to the global loss, values and
gradients alike.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

MleTarget = Literal["all", "best"]


def length_normalised_scores(logprob_sum: Tensor, num_tokens: Tensor) -> Tensor:
    """Per-token mean log-likelihood ``s = logprob_sum / max(num_tokens, 1)``, shape [B, N].

    ``num_tokens`` is clamped to 1 so that a candidate with no response tokens (the prompt
    filled the max length) scores ``logprob_sum`` (normally 0) instead of dividing by zero.
    Such a candidate carries no signal; callers should mask it out.

    >>> length_normalised_scores(torch.tensor([[-4.0, 0.0]]), torch.tensor([[2, 0]]))
    tensor([[-2.,  0.]])
    """
    return logprob_sum / num_tokens.clamp(min=1)


def pairs_per_gap(mask: Tensor) -> Tensor:
    """Number of pairs (j, j+i) with both candidates valid, for each gap i = 1..N-1.

    Returns an int64 tensor of shape [N-1]; index 0 is gap 1.

    >>> pairs_per_gap(torch.tensor([[True, True, True], [True, True, False]]))
    tensor([3, 1])
    """
    counts = [(mask[:, :-gap] & mask[:, gap:]).sum() for gap in range(1, mask.shape[1])]
    if not counts:
        return torch.zeros(0, dtype=torch.int64, device=mask.device)
    return torch.stack(counts)


def ranking_loss(
    scores: Tensor, mask: Tensor, margin: float = 0.1, pair_counts: Tensor | None = None
) -> Tensor:
    """Margin ranking loss over all gaps, a scalar.

    ``L_rank = sum_i [sum over valid pairs (j, j+i) of max(0, s_{j+i} - s_j + i*margin)] / C_i``
    with ``C_i = pair_counts[i-1]`` (global counts, for micro-batch invariance) or, by default,
    the local ``pairs_per_gap(mask)[i-1]``. ``pair_counts`` may be longer than N-1; raises
    ValueError when it lacks, or undercounts, a gap that has valid pairs here.

    >>> ranking_loss(torch.tensor([[-1.0, -0.5, -2.0]]), torch.ones(1, 3, dtype=torch.bool))
    tensor(0.3000)
    """
    scores = torch.where(mask, scores, torch.zeros_like(scores))  # keeps NaN out of gradients
    counts = pairs_per_gap(mask)
    if pair_counts is not None:
        counts = _global_pair_counts(counts, pair_counts)
    loss = scores[:, :0].sum()  # 0, but part of the graph even when N = 1
    for gap in range(1, scores.shape[1]):
        valid = mask[:, :-gap] & mask[:, gap:]
        hinge = (scores[:, gap:] - scores[:, :-gap] + gap * margin).clamp(min=0)
        loss = loss + torch.where(valid, hinge, 0.0).sum() / counts[gap - 1].clamp(min=1)
    return loss


def _global_pair_counts(local: Tensor, pair_counts: Tensor) -> Tensor:
    """``pair_counts`` cut or zero-padded to ``local``'s length, checked to cover it."""
    pair_counts = torch.as_tensor(pair_counts, device=local.device)
    padded = torch.zeros_like(local)
    kept = min(local.numel(), pair_counts.numel())
    padded[:kept] = pair_counts[:kept]
    short = (padded < local).nonzero()
    if short.numel():
        gap = int(short[0]) + 1
        raise ValueError(
            f"pair_counts gives {int(padded[gap - 1])} pairs for gap {gap} (missing counts are 0),"
            f" but this batch alone has {int(local[gap - 1])}; build it over the global batch"
        )
    return padded


def _check_mask(mask: Tensor) -> None:
    if mask.dim() != 2 or mask.dtype != torch.bool or mask.shape[1] == 0:
        raise ValueError(f"mask must be bool [B, N>=1], got {mask.dtype} {list(mask.shape)}")
    if not bool(mask[:, 0].all()):
        raise ValueError("every row of mask needs at least one valid candidate, first")
    if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError("valid candidates must come first in each row of mask")


def _mle_mask(mask: Tensor, mle_target: MleTarget) -> Tensor:
    if mle_target == "all":
        return mask
    if mle_target == "best":
        best = torch.zeros_like(mask)
        best[:, 0] = True
        return mask & best
    raise ValueError(f"mle_target must be 'all' or 'best', got {mle_target!r}")


@dataclass(frozen=True)
class LossNormaliser:
    """The loss's denominators for a (global) batch.

    pairs_per_gap: int64 [G], number of valid pairs per gap (index 0 = gap 1).
    mle_tokens: scalar, number of tokens of the MLE candidates.

    Build one per micro-batch with :meth:`from_batch`, combine them with :meth:`sum`, and
    all-reduce (sum) both tensors across ranks after :meth:`padded` to a common length.
    """

    pairs_per_gap: Tensor
    mle_tokens: Tensor

    @classmethod
    def from_batch(
        cls, mask: Tensor, num_tokens: Tensor, mle_target: MleTarget = "all"
    ) -> LossNormaliser:
        _check_mask(mask)
        mle_mask = _mle_mask(mask, mle_target)
        tokens = torch.where(mle_mask, num_tokens, torch.zeros_like(num_tokens)).sum()
        return cls(pairs_per_gap(mask), tokens)

    @classmethod
    def sum(cls, normalisers: Iterable[LossNormaliser]) -> LossNormaliser:
        """Normaliser of the union of the batches, gap vectors zero-padded to equal length."""
        normalisers = list(normalisers)
        if not normalisers:
            raise ValueError("LossNormaliser.sum needs at least one normaliser")
        num_gaps = max(n.pairs_per_gap.numel() for n in normalisers)
        pairs = torch.stack([n.padded(num_gaps).pairs_per_gap for n in normalisers]).sum(0)
        tokens = torch.stack([n.mle_tokens for n in normalisers]).sum(0)
        return cls(pairs, tokens)

    def padded(self, num_gaps: int) -> LossNormaliser:
        """The same normaliser with ``pairs_per_gap`` zero-padded to ``num_gaps`` entries."""
        extra = num_gaps - self.pairs_per_gap.numel()
        if extra < 0:
            raise ValueError(f"cannot pad {self.pairs_per_gap.numel()} gaps down to {num_gaps}")
        pairs = torch.nn.functional.pad(self.pairs_per_gap, (0, extra))
        return LossNormaliser(pairs, self.mle_tokens)


@dataclass(frozen=True)
class LossParts:
    """Scalar loss tensors: ``total = mle_weight * mle + ranking``."""

    total: Tensor
    ranking: Tensor
    mle: Tensor


def tuna_loss(
    logprob_sum: Tensor,
    num_tokens: Tensor,
    mask: Tensor,
    *,
    margin: float = 0.1,
    mle_weight: float = 1.0,
    mle_target: MleTarget = "all",
    normaliser: LossNormaliser | None = None,
) -> LossParts:
    """Tuna's loss ``mle_weight * L_MLE + L_rank`` for a batch of ranked candidates.

    logprob_sum: [B, N] float, summed student log-probs of each candidate's response tokens.
    num_tokens: [B, N] int, response token counts (EOS included).
    mask: [B, N] bool, valid candidates first in each row.
    normaliser: global denominators; without one the batch is its own global batch.

    ``mle_weight=0`` gives the pure ranking loss; with N = 1 (SFT) the ranking term is 0.

    >>> logprob_sum = torch.tensor([[-2.0, -1.0, -6.0], [-3.0, -9.0, 0.0]])
    >>> num_tokens = torch.tensor([[2, 2, 3], [3, 3, 0]])
    >>> mask = torch.tensor([[True, True, True], [True, True, False]])
    >>> parts = tuna_loss(logprob_sum, num_tokens, mask)
    >>> parts.total.shape, round(parts.ranking.item(), 4), round(parts.mle.item(), 4)
    (torch.Size([]), 0.2, 1.6154)
    """
    local = LossNormaliser.from_batch(mask, num_tokens, mle_target)
    if normaliser is None:
        normaliser = local
    elif bool(local.mle_tokens > normaliser.mle_tokens):
        raise ValueError(
            f"normaliser counts {int(normaliser.mle_tokens)} MLE tokens, but this batch alone has"
            f" {int(local.mle_tokens)}; build it over the global batch with the same mle_target"
        )
    logprob_sum = torch.where(mask, logprob_sum, torch.zeros_like(logprob_sum))
    num_tokens = torch.where(mask, num_tokens, torch.ones_like(num_tokens))
    scores = length_normalised_scores(logprob_sum, num_tokens)
    ranking = ranking_loss(scores, mask, margin, normaliser.pairs_per_gap)
    mle_logprob = torch.where(_mle_mask(mask, mle_target), logprob_sum, 0.0).sum()
    mle = -mle_logprob / normaliser.mle_tokens.clamp(min=1)
    return LossParts(total=mle_weight * mle + ranking, ranking=ranking, mle=mle)


def pairwise_accuracy(scores: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(pairs ranked right, pairs) over valid pairs j < k; right: ``s_j > s_k`` (ties are wrong).

    Both are int64 scalars, so callers can sum them across batches and ranks.

    >>> pairwise_accuracy(torch.tensor([[3.0, 1.0, 2.0]]), torch.ones(1, 3, dtype=torch.bool))
    (tensor(2), tensor(3))
    """
    n = scores.shape[1]
    later = torch.ones(n, n, dtype=torch.bool, device=scores.device).triu(1)
    pairs = mask[:, :, None] & mask[:, None, :] & later
    right = pairs & (scores[:, :, None] > scores[:, None, :])
    return right.sum(), pairs.sum()
