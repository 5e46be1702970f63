"""The packed, prompt-shared forward of a ranking micro-batch: no padding, each prompt once.

Stage: train (pure torch, no Ray). A micro-batch holds B instructions with N answers each. The
padded formulation (``collate.collate_ranked``) runs B·N sequences padded to the longest, and
recomputes each prompt N times. Here each instruction becomes one *group*::

    [prompt tokens][answer 0 tokens][answer 1 tokens] ... [answer N-1 tokens]

with positions continuing from the prompt in every answer (prompt 0..p-1, each answer p..), and
a "tree" attention mask: a prompt token attends to the prompt before it; an answer token to the
whole prompt and to its own answer up to itself; nothing crosses groups. That is exactly what
each answer sees in its own forward pass, so the log-probs are the same (up to float rounding),
and gradients flow into the prompt's activations from all N answers. Groups are packed into a
few rows (first fit, longest first) so that rows have similar lengths; only the row tails pad.

The prompt shared by a group is the longest common prefix of its sequences within the shortest
prompt: tokenisation is joint (train/features.py), so a token straddling the prompt/answer
boundary may differ between answers; such tokens stay in each answer's own segment.

The first answer token is predicted by the prompt's last position, which all answers share: one
hidden state, N targets. The output head is applied only at predicting positions, in chunks of
at most ``HEAD_CHUNK_LOGITS`` logits, recomputed in backward (no [tokens, vocab] fp32 tensor for
the whole batch).

    >>> b = pack_ranked([{"input_ids": [[5, 6, 7, 2], [5, 6, 8, 9, 2]], "prompt_len": [2, 2]}],
    ...                 pad_id=0)
    >>> b.input_ids.tolist(), b.position_ids.tolist(), b.segment.tolist()
    ([[5, 6, 7, 2, 8, 9, 2]], [[0, 1, 2, 3, 2, 3, 4]], [[0, 0, 1, 1, 2, 2, 2]])
    >>> b.predict_index.tolist(), b.targets.tolist(), b.num_tokens.tolist()
    ([1, 2, 1, 4, 5], [7, 2, 8, 9, 2], [[2.0, 3.0]])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Rows of the output head per chunk: 64 Mi logits (256 MB in fp32) at most.
HEAD_CHUNK_LOGITS = 2**26


@dataclass
class PackedBatch:
    """One micro-batch, packed: R rows of L tokens (see the module docstring)."""

    input_ids: torch.Tensor  # [R, L] long
    position_ids: torch.Tensor  # [R, L] long: positions inside each sequence
    group: torch.Tensor  # [R, L] long: instruction index; pads get their own negative ids
    segment: torch.Tensor  # [R, L] long: 0 = shared prompt, k + 1 = answer k
    predict_index: torch.Tensor  # [T] long: flat (row * L + col) index of predicting positions
    targets: torch.Tensor  # [T] long: the token each predicts
    token_owner: torch.Tensor  # [T] long: candidate (0..S-1) each predicted token belongs to
    cand_row: torch.Tensor  # [S] long: instruction of candidate s
    cand_col: torch.Tensor  # [S] long: rank of candidate s (0 = best)
    mask: torch.Tensor  # [B, N] bool: valid candidates, valid ones first
    num_tokens: torch.Tensor  # [B, N] float: response tokens per candidate
    unpacked_tokens: torch.Tensor  # [] long: tokens of the B·N sequences, each counted whole

    @property
    def num_sequences(self) -> int:
        return int(self.cand_row.shape[0])

    @property
    def num_real_tokens(self) -> int:
        """Tokens of the candidate sequences as the padded formulation counts them."""
        return int(self.unpacked_tokens)

    @property
    def num_computed_tokens(self) -> int:
        return int((self.group >= 0).sum())


def _shared_prefix(seqs: list[list[int]], limit: int) -> int:
    n = 0
    while n < limit and all(s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


def pack_ranked(
    rows: list[dict], pad_id: int, max_candidates: int | None = None, row_tokens: int = 0
) -> PackedBatch:
    """Pack ``rows`` (each ``input_ids``: list of id lists, ``prompt_len``) into rows of at
    least ``row_tokens`` (and at least the longest group) tokens."""
    groups = []  # (tokens, positions, segments, predictor local index, targets, owners)
    cand_row, cand_col, num_tokens = [], [], []
    unpacked = 0
    for b, row in enumerate(rows):
        seqs = [[int(t) for t in ids] for ids in list(row["input_ids"])[:max_candidates]]
        plens = [int(p) for p in list(row["prompt_len"])[: len(seqs)]]
        shared = _shared_prefix(seqs, min(plens))
        tokens, positions = list(seqs[0][:shared]), list(range(shared))
        segments = [0] * shared
        predictors, targets, owners = [], [], []
        for k, (ids, p) in enumerate(zip(seqs, plens)):
            start = len(tokens)  # where answer k's own segment begins in the group
            tokens += ids[shared:]
            positions += range(shared, len(ids))
            segments += [k + 1] * (len(ids) - shared)
            first = max(p, 1)  # position 0 has no prefix to predict it from
            for t in range(first, len(ids)):
                src = t - 1
                predictors.append(src if src < shared else start + src - shared)
                targets.append(ids[t])
                owners.append(len(cand_row))
            cand_row.append(b)
            cand_col.append(k)
            num_tokens.append(len(ids) - first)
            unpacked += len(ids)
        groups.append((tokens, positions, segments, predictors, targets, owners))
    if not cand_row:
        raise ValueError("empty micro-batch")

    # First fit, longest first, into rows of `capacity` tokens.
    capacity = max(row_tokens, max(len(g[0]) for g in groups))
    fill: list[int] = []
    placement = {}
    for gi in sorted(range(len(groups)), key=lambda i: -len(groups[i][0])):
        size = len(groups[gi][0])
        r = next((r for r, used in enumerate(fill) if used + size <= capacity), None)
        if r is None:
            r = len(fill)
            fill.append(0)
        placement[gi] = (r, fill[r])
        fill[r] += size
    num_rows, width = len(fill), max(fill)
    input_ids = torch.full((num_rows, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((num_rows, width), dtype=torch.long)
    segment = torch.zeros((num_rows, width), dtype=torch.long)
    # Every pad position is its own group (it attends to itself only: no empty softmax rows).
    group = -1 - torch.arange(num_rows * width, dtype=torch.long).view(num_rows, width)
    predict_index, all_targets, all_owners = [], [], []
    for gi, (tokens, positions, segments, predictors, targets, owners) in enumerate(groups):
        r, offset = placement[gi]
        span = slice(offset, offset + len(tokens))
        input_ids[r, span] = torch.tensor(tokens, dtype=torch.long)
        position_ids[r, span] = torch.tensor(positions, dtype=torch.long)
        segment[r, span] = torch.tensor(segments, dtype=torch.long)
        group[r, span] = gi
        predict_index += [r * width + offset + i for i in predictors]
        all_targets += targets
        all_owners += owners
    rows_t = torch.tensor(cand_row, dtype=torch.long)
    cols_t = torch.tensor(cand_col, dtype=torch.long)
    mask = torch.zeros((len(rows), max(cand_col) + 1), dtype=torch.bool)
    mask[rows_t, cols_t] = True
    grid_tokens = torch.zeros(mask.shape, dtype=torch.float32)
    grid_tokens[rows_t, cols_t] = torch.tensor(num_tokens, dtype=torch.float32)
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        group=group,
        segment=segment,
        predict_index=torch.tensor(predict_index, dtype=torch.long),
        targets=torch.tensor(all_targets, dtype=torch.long),
        token_owner=torch.tensor(all_owners, dtype=torch.long),
        cand_row=rows_t,
        cand_col=cols_t,
        mask=mask,
        num_tokens=grid_tokens,
        unpacked_tokens=torch.tensor(unpacked, dtype=torch.long),
    )


def tree_attention_mask(batch: PackedBatch) -> torch.Tensor:
    """[R, 1, L, L] bool, True where query q may attend to key k (see the module docstring)."""
    g, pos, seg = batch.group, batch.position_ids, batch.segment
    same_group = g[:, :, None] == g[:, None, :]
    causal = pos[:, None, :] <= pos[:, :, None]
    visible = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
    return (same_group & causal & visible)[:, None]


def _attention_mask_for(lm, batch: PackedBatch):
    mask = tree_attention_mask(batch)
    if getattr(lm.config, "_attn_implementation", "sdpa") == "eager":
        # eager attention adds the mask to the scores
        dtype = next(lm.parameters()).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min
        )
    return mask


class _ChunkedTokenLogprob(torch.autograd.Function):
    """log p(target) = logit[target] - logsumexp(logits) per row, the logits built ``rows`` at a
    time in forward and again in backward; only the hidden rows, the weight and one fp32
    log-sum-exp per row are kept. Numerics as ``head(hidden).float()`` then cross-entropy."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows: int):
        out, lse = [], []
        for h, t in zip(hidden.split(rows), targets.split(rows)):
            logits = F.linear(h, weight, bias).float()
            chunk_lse = torch.logsumexp(logits, dim=-1)
            out.append(logits.gather(1, t[:, None])[:, 0] - chunk_lse)
            lse.append(chunk_lse)
        ctx.save_for_backward(hidden, weight, bias, targets, torch.cat(lse))
        ctx.rows = rows
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        grad_bias = None if bias is None else torch.zeros_like(bias, dtype=torch.float32)
        for i in range(0, hidden.shape[0], ctx.rows):
            h, t = hidden[i : i + ctx.rows], targets[i : i + ctx.rows]
            logits = F.linear(h, weight, bias).float()
            # d(logit[t] - lse) / d logits = onehot(t) - softmax
            grad_logits = -torch.exp(logits - lse[i : i + ctx.rows, None])
            grad_logits[torch.arange(t.shape[0], device=t.device), t] += 1.0
            grad_logits *= grad_out[i : i + ctx.rows, None]
            grad_hidden[i : i + ctx.rows] = (grad_logits.to(weight.dtype) @ weight).to(h.dtype)
            grad_weight += grad_logits.T @ h.float()
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight.to(weight.dtype), grad_bias, None, None


def head_token_logprobs(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    chunk_logits: int | None = None,
):
    """log p(target) for each row of ``hidden`` [T, H] under the linear output ``head``, in
    chunks of at most ``chunk_logits`` logits (default HEAD_CHUNK_LOGITS).

    The head's weight is used as a tensor, not by calling the module once per chunk: under
    ZeRO-3 every module call is a collective, and ranks hold different numbers of response
    tokens. The caller must make the weight available (``CandidateScorer`` registers it as an
    external parameter of the module DeepSpeed wraps).
    """
    vocab = head.weight.ds_shape[0] if hasattr(head.weight, "ds_shape") else head.weight.shape[0]
    rows = max(1, (chunk_logits or HEAD_CHUNK_LOGITS) // max(vocab, 1))
    if hidden.shape[0] <= rows:  # one chunk: plain autograd keeps the logits, no recompute
        logits = F.linear(hidden, head.weight, head.bias).float()
        return -F.cross_entropy(logits, targets, reduction="none")
    return _ChunkedTokenLogprob.apply(hidden, head.weight, head.bias, targets, rows)


def packed_candidate_logprobs(
    lm, batch: PackedBatch, *, plain_head: bool = True, chunk_logits: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logprob_sum [B, N], num_tokens [B, N])`` of the packed micro-batch."""
    attention_mask = _attention_mask_for(lm, batch)
    kwargs = {
        "input_ids": batch.input_ids,
        "attention_mask": attention_mask,
        "position_ids": batch.position_ids,
        "use_cache": False,
    }
    if plain_head:
        hidden = lm.get_decoder()(**kwargs).last_hidden_state
        selected = hidden.reshape(-1, hidden.shape[-1])[batch.predict_index]
        token_logprob = head_token_logprobs(
            lm.get_output_embeddings(), selected, batch.targets, chunk_logits
        )
    else:  # heads that soft-cap or scale logits: the model's own full-logits forward
        logits = lm(**kwargs).logits
        selected = logits.reshape(-1, logits.shape[-1])[batch.predict_index].float()
        token_logprob = -F.cross_entropy(selected, batch.targets, reduction="none")
    per_seq = torch.zeros(
        batch.num_sequences, dtype=token_logprob.dtype, device=token_logprob.device
    ).index_add(0, batch.token_owner, token_logprob)
    grid = torch.zeros(batch.mask.shape, dtype=per_seq.dtype, device=per_seq.device)
    grid = grid.index_put((batch.cand_row, batch.cand_col), per_seq)
    return grid, batch.num_tokens.to(per_seq.device)
