"""Collation shapes and the response-only log-prob path against the reference formulation."""

from __future__ import annotations

import doctest

import pytest
import torch
from transformers import AutoModelForCausalLM

import tuna_ray.train.collate as collate_module
from tuna_ray.train.collate import collate_ranked
from tuna_ray.train.logprobs import candidate_logprobs, reference_candidate_logprobs
from tuna_ray.train.loss import tuna_loss


def test_collate_doctest():
    assert doctest.testmod(collate_module).failed == 0


def _rows(seed: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in (3, 1, 2):  # ragged N
        ids, plen = [], []
        prompt = torch.randint(
            3, vocab, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g
        ).tolist()
        for _ in range(n):
            answer = torch.randint(
                3, vocab, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g
            ).tolist()
            ids.append(prompt + answer + [2])
            plen.append(len(prompt))
        rows.append({"input_ids": ids, "prompt_len": plen})
    return rows


def test_collate_masks_follow_prompt_lengths():
    rows = _rows(0, 100)
    b = collate_ranked(rows, pad_id=0)
    assert b.mask.tolist() == [[True, True, True], [True, False, False], [True, True, False]]
    assert b.num_sequences == 6
    for s in range(b.num_sequences):
        r, k = int(b.cand_row[s]), int(b.cand_col[s])
        ids, p = rows[r]["input_ids"][k], rows[r]["prompt_len"][k]
        assert b.target_mask[s].nonzero().flatten().tolist() == list(range(p, len(ids)))
        assert b.num_tokens[r, k] == len(ids) - p


@pytest.mark.parametrize("seed", [0, 1])
def test_response_only_head_matches_full_log_softmax(tiny_model_path, seed):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float64)
    b = collate_ranked(_rows(seed, model.config.vocab_size), pad_id=0)
    ours, n1 = candidate_logprobs(model, b)
    ref, n2 = reference_candidate_logprobs(model, b)
    assert torch.equal(n1, n2)
    assert torch.allclose(ours, ref, atol=1e-9)
    assert bool((ours[b.mask] < 0).all()) and bool((ours[~b.mask] == 0).all())
    g1 = torch.autograd.grad(tuna_loss(ours, n1, b.mask).total, model.lm_head.weight)[0]
    g2 = torch.autograd.grad(tuna_loss(ref, n2, b.mask).total, model.lm_head.weight)[0]
    assert torch.allclose(g1, g2, atol=1e-9)
