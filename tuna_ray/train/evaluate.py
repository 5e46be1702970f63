"""Held-out ranking metrics of a model on ranked records (plain torch, no Ray).

``ranking_accuracy`` scores every candidate with the same length-normalised log-likelihood the
loss uses and reports the share of ordered pairs the model agrees with. Used by tests (does
training move the student toward the given order?) and by users on a held-out ranked split.
"""

from __future__ import annotations

import torch

from tuna_ray.data.templates import render_prompt, response_separator
from tuna_ray.train.collate import collate_ranked
from tuna_ray.train.features import tokenize_candidates
from tuna_ray.train.logprobs import candidate_logprobs
from tuna_ray.train.loss import length_normalised_scores, pairwise_accuracy


@torch.no_grad()
def score_candidates(
    model,
    tokenizer,
    records: list[dict],
    *,
    template: str = "alpaca",
    system_prompt: str | None = None,
    max_length: int = 512,
    batch_size: int = 8,
) -> list[list[float]]:
    """Length-normalised log-likelihood of each (kept) candidate of each record."""
    model.eval()
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    rows = []
    for rec in records:
        prompt = (
            render_prompt(
                rec["instruction"],
                rec.get("input") or "",
                template=template,
                tokenizer=tokenizer,
                system=system_prompt,
            )
            if rec.get("instruction")
            else rec["prompt"]
        )
        ex = tokenize_candidates(
            prompt,
            list(rec["responses"]),
            tokenizer,
            max_length=max_length,
            separator=response_separator(template),
            add_special_tokens=template == "alpaca",
        )
        rows.append({"input_ids": ex.input_ids, "prompt_len": ex.prompt_len})
    scores: list[list[float]] = []
    for i in range(0, len(rows), batch_size):
        batch = collate_ranked(rows[i : i + batch_size], pad_id)
        logprob_sum, num_tokens = candidate_logprobs(model, batch)
        s = length_normalised_scores(logprob_sum, num_tokens)
        scores.extend(s[b][batch.mask[b]].tolist() for b in range(s.shape[0]))
    return scores


def ranking_accuracy(scores: list[list[float]]) -> float:
    """Share of ordered pairs (j < k, j given as better) with score_j > score_k."""
    n = max(len(s) for s in scores)
    grid = torch.full((len(scores), n), float("nan"))
    mask = torch.zeros((len(scores), n), dtype=torch.bool)
    for b, s in enumerate(scores):
        grid[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = True
    right, pairs = pairwise_accuracy(grid, mask)
    return float(right) / max(float(pairs), 1.0)
