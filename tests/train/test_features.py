"""Joint tokenisation: the prompt/response boundary, EOS, explicit truncation."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from tuna_ray.data.templates import render_prompt
from tuna_ray.train.features import tokenize_candidates


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return AutoTokenizer.from_pretrained(smollm2_path)


def test_boundary_comes_from_offsets_and_eos_is_a_response_token(tokenizer):
    prompt = render_prompt("Name a colour.")
    ex = tokenize_candidates(prompt, ["Blue.", "Green is nice."], tokenizer, max_length=256)
    assert ex.kept_ranks == [0, 1] and ex.num_truncated == ex.num_dropped == 0
    for ids, p, answer in zip(ex.input_ids, ex.prompt_len, ["Blue.", "Green is nice."]):
        assert ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids[:p]) == prompt
        assert tokenizer.decode(ids[p:-1]) == answer


def test_a_token_straddling_the_boundary_counts_as_response(tokenizer):
    # "Response:" + "::" can merge across the boundary; the merged token must carry loss.
    prompt, answer = "x ### Response:", ":: done"
    ex = tokenize_candidates(prompt, [answer, "ok"], tokenizer, max_length=64)
    ids, p = ex.input_ids[0], ex.prompt_len[0]
    assert tokenizer.decode(ids[:p]) in prompt  # the prompt part never includes answer text
    assert answer in tokenizer.decode(ids[p - 1 :]) or tokenizer.decode(ids[p:-1]).endswith("done")
    joint = tokenizer(prompt + answer)["input_ids"]
    assert ids[:-1] == joint  # one joint tokenisation, not prompt and answer apart


def test_truncation_is_counted_and_prompt_filling_the_window_drops_the_candidate(tokenizer):
    prompt = render_prompt("Repeat after me: " + "word " * 40)
    n_prompt = len(tokenizer(prompt)["input_ids"])
    ex = tokenize_candidates(prompt, ["a " * 30, "b"], tokenizer, max_length=n_prompt + 5)
    assert ex.num_truncated == 1
    assert len(ex.input_ids[0]) == n_prompt + 5
    assert ex.input_ids[0][-1] != tokenizer.eos_token_id  # cut: the answer did not end
    assert ex.num_response_tokens == [5, 2]
    full = tokenize_candidates(prompt, ["a", "b"], tokenizer, max_length=n_prompt)
    assert full.input_ids == [] and full.num_dropped == 2 and full.num_truncated == 2


def test_chat_template_prompt_keeps_its_special_tokens_once(tokenizer):
    prompt = render_prompt("Hi", template="chat", tokenizer=tokenizer)
    ex = tokenize_candidates(
        prompt, ["Hello!"], tokenizer, max_length=128, add_special_tokens=False
    )
    assert tokenizer.decode(ex.input_ids[0]) == prompt + "Hello!" + tokenizer.eos_token
