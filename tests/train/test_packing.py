"""The packed, prompt-shared forward equals the reference formulation (loss, scores, gradients).

Real batches: shipped Alpaca/AlpacaEval answers tokenised with the model's tokenizer through the
trainer's own feature code, with ragged N and candidates truncated by max_length.
"""

from __future__ import annotations

import doctest
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.support import SHIPPED
from tuna_ray.data.templates import render_prompt
from tuna_ray.train import packing
from tuna_ray.train.collate import collate_ranked
from tuna_ray.train.features import tokenize_candidates
from tuna_ray.train.logprobs import CandidateScorer, reference_candidate_logprobs
from tuna_ray.train.loss import tuna_loss
from tuna_ray.train.packing import pack_ranked, packed_candidate_logprobs, tree_attention_mask


def test_packing_doctest():
    assert doctest.testmod(packing).failed == 0


def _real_rows(model_path, *, count: int, max_length: int) -> list[dict]:
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    lines = (SHIPPED / "alpaca_eval_ranked_64.jsonl").read_text().splitlines()[:count]
    rows = []
    for i, line in enumerate(lines):
        rec = json.loads(line)
        responses = (
            rec["responses"][: 1 + (i % len(rec["responses"]))] if i % 3 else rec["responses"]
        )
        responses = responses if len(responses) > 1 else rec["responses"][:2]
        prompt = render_prompt(rec["instruction"], rec.get("input") or "", template="alpaca")
        ex = tokenize_candidates(prompt, responses, tokenizer, max_length=max_length)
        rows.append({"input_ids": ex.input_ids, "prompt_len": ex.prompt_len})
    return rows


def _loss_and_grads(model, scores_fn, batch):
    model.zero_grad(set_to_none=True)
    logprob_sum, num_tokens = scores_fn(model, batch)
    parts = tuna_loss(logprob_sum, num_tokens, batch.mask)
    parts.total.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return parts, logprob_sum.detach(), grads


def _assert_same(model, rows, pad_id, rel=1e-4):
    padded = collate_ranked(rows, pad_id)
    packed = pack_ranked(rows, pad_id, row_tokens=128)
    assert torch.equal(padded.mask, packed.mask) and torch.equal(
        padded.num_tokens, packed.num_tokens
    )
    assert packed.num_real_tokens == padded.num_real_tokens
    assert packed.num_computed_tokens < padded.num_real_tokens  # each prompt computed once
    ref_parts, ref_scores, ref_grads = _loss_and_grads(model, reference_candidate_logprobs, padded)
    parts, scores, grads = _loss_and_grads(model, packed_candidate_logprobs, packed)
    assert torch.allclose(scores, ref_scores, rtol=rel, atol=1e-5), (
        (scores - ref_scores).abs().max()
    )
    for name in ("total", "ranking", "mle"):
        assert getattr(parts, name).item() == pytest.approx(
            getattr(ref_parts, name).item(), rel=rel
        )
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        ref = ref_grads[name]
        err = float((g - ref).norm() / ref.norm().clamp(min=1e-12))
        assert err <= rel, (name, err)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_reference_on_tiny_model(tiny_model_path, attn):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_path, dtype=torch.float32, attn_implementation=attn
    )
    rows = _real_rows(tiny_model_path, count=6, max_length=96)
    assert any(len(ids) == 96 for r in rows for ids in r["input_ids"]), "no truncated candidate"
    assert len({len(r["input_ids"]) for r in rows}) > 1, "N is not ragged"
    _assert_same(model, rows, model.config.pad_token_id)


@pytest.mark.slow
def test_packed_equals_reference_on_real_smollm2(smollm2_path):
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    rows = _real_rows(smollm2_path, count=3, max_length=160)
    _assert_same(model, rows, model.config.pad_token_id)


def test_chunked_head_equals_one_pass(tiny_model_path, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    rows = _real_rows(tiny_model_path, count=4, max_length=64)
    batch = pack_ranked(rows, model.config.pad_token_id)
    _, whole_scores, whole_grads = _loss_and_grads(model, packed_candidate_logprobs, batch)
    # Chunks of 7 rows: every chunk's logits are recomputed in backward.
    monkeypatch.setattr(packing, "HEAD_CHUNK_LOGITS", 7 * model.config.vocab_size)
    _, scores, grads = _loss_and_grads(model, packed_candidate_logprobs, batch)
    assert torch.allclose(scores, whole_scores, atol=1e-5)
    for name, g in grads.items():
        ref = whole_grads[name]
        assert float((g - ref).norm() / ref.norm()) <= 1e-5, name


def test_tree_mask_shares_the_prompt_and_nothing_else():
    rows = [
        {"input_ids": [[5, 6, 7, 2], [5, 6, 8, 9, 2]], "prompt_len": [2, 2]},
        {"input_ids": [[3, 4, 2], [3, 1, 2]], "prompt_len": [2, 2]},  # boundary token differs
    ]
    b = pack_ranked(rows, pad_id=0, row_tokens=100)
    assert b.input_ids.shape[0] == 1  # both groups fit one row
    m = tree_attention_mask(b)[0, 0]
    g, seg = b.group[0], b.segment[0]
    for q in range(m.shape[0]):
        for k in range(m.shape[1]):
            if m[q, k]:
                assert g[q] == g[k] and b.position_ids[0, k] <= b.position_ids[0, q]
                assert seg[k] == 0 or seg[k] == seg[q]
    # Group 1 shares only [3]: its second prompt token differs between the two answers.
    assert (seg[g == 1] == 0).sum() == 1


def test_scorer_dispatches_on_the_batch_kind(tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float64)
    rows = _real_rows(tiny_model_path, count=3, max_length=64)
    scorer = CandidateScorer(model)
    a, _ = scorer(collate_ranked(rows, 0))
    b, _ = scorer(pack_ranked(rows, 0))
    assert torch.allclose(a, b, atol=1e-9)
