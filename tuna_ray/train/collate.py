"""Collation: a micro-batch of ranked examples -> one padded [S, T] tensor for one forward.

All valid candidates of all instructions in the micro-batch are stacked into S rows (no padded
candidate slots are ever run through the model); ``cand_row``/``cand_col`` put each row's result
back on the [B, N] grid the loss works on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RankingBatch:
    """One micro-batch, shaped for a single forward pass.

    >>> b = collate_ranked([
    ...     {"input_ids": [[5, 6, 7, 2], [5, 6, 2]], "prompt_len": [2, 2]},
    ...     {"input_ids": [[8, 9, 2]], "prompt_len": [1]},
    ... ], pad_id=0)
    >>> b.input_ids.shape, b.mask.shape      # S=3 sequences, T=4; B=2 instructions, N=2
    (torch.Size([3, 4]), torch.Size([2, 2]))
    >>> b.target_mask.int().tolist()         # tokens that carry loss (response + EOS)
    [[0, 0, 1, 1], [0, 0, 1, 0], [0, 1, 1, 0]]
    >>> b.mask.tolist(), b.num_tokens.tolist()
    ([[True, True], [True, False]], [[2.0, 1.0], [2.0, 0.0]])
    """

    input_ids: torch.Tensor  # [S, T] long, right-padded
    attention_mask: torch.Tensor  # [S, T] long
    target_mask: torch.Tensor  # [S, T] bool: token t is a response token (predicted from t-1)
    cand_row: torch.Tensor  # [S] long: instruction index in the micro-batch
    cand_col: torch.Tensor  # [S] long: rank of the candidate (0 = best)
    mask: torch.Tensor  # [B, N] bool: valid candidates, valid ones first
    num_tokens: torch.Tensor  # [B, N] float: response tokens per candidate (0 where masked)

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_real_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate_ranked(
    rows: list[dict], pad_id: int, max_candidates: int | None = None
) -> RankingBatch:
    """Stack the candidates of ``rows`` (each ``input_ids``: list of id lists, ``prompt_len``)."""
    seqs, prompt_lens, cand_row, cand_col = [], [], [], []
    for b, row in enumerate(rows):
        ids_list = list(row["input_ids"])[:max_candidates]
        for k, ids in enumerate(ids_list):
            seqs.append(list(ids))
            prompt_lens.append(int(row["prompt_len"][k]))
            cand_row.append(b)
            cand_col.append(k)
    if not seqs:
        raise ValueError("empty micro-batch")
    num_rows = len(rows)
    n_max = max(cand_col) + 1
    t_max = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), t_max), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), t_max), dtype=torch.long)
    target = torch.zeros((len(seqs), t_max), dtype=torch.bool)
    for i, (s, p) in enumerate(zip(seqs, prompt_lens)):
        input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention[i, : len(s)] = 1
        # Position 0 has no prefix to predict it from, so it never carries loss.
        target[i, max(p, 1) : len(s)] = True
    rows_t = torch.tensor(cand_row, dtype=torch.long)
    cols_t = torch.tensor(cand_col, dtype=torch.long)
    mask = torch.zeros((num_rows, n_max), dtype=torch.bool)
    mask[rows_t, cols_t] = True
    num_tokens = torch.zeros((num_rows, n_max), dtype=torch.float32)
    num_tokens[rows_t, cols_t] = target.sum(dim=1).float()
    return RankingBatch(input_ids, attention, target, rows_t, cols_t, mask, num_tokens)
