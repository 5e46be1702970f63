"""The hf engine: raw token log-probs of samples, scoring given answers, seeding, errors."""

from __future__ import annotations

import pytest
import torch

from tuna_ray.data.templates import render_prompt
from tuna_ray.engines.base import EngineError, Prompt, SamplingParams
from tuna_ray.engines.hf import HFEngine

FRANCE = Prompt("france", text=render_prompt("What is the capital of France?"))


@pytest.fixture(scope="module")
def tiny(tiny_model_path) -> HFEngine:
    return HFEngine(str(tiny_model_path), batch_size=2)


@pytest.fixture(scope="module")
def smol(smollm2_path) -> HFEngine:
    return HFEngine(str(smollm2_path))


def direct_logprobs(engine: HFEngine, ids: list[int], start: int) -> list[float]:
    """Slow, obvious reference: one unpadded forward pass, log-prob of ids[start:]."""
    with torch.no_grad():
        logits = engine.model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return [logp[i - 1, ids[i]].item() for i in range(start, len(ids))]


def test_samples_have_one_logprob_per_token(tiny, tiny_model_path):
    prompts = [Prompt("a", text="Hello there"), Prompt("b", text="A longer prompt, padded left")]
    prompts.append(Prompt("c", text="Third prompt: its own batch"))  # batch_size=2
    out = tiny.sample(prompts, SamplingParams(n=3, max_tokens=4, seed=0))
    assert tiny.name == f"hf:{tiny_model_path}"
    assert [len(samples) for samples in out] == [3, 3, 3]
    for samples in out:
        for s in samples:
            assert 1 <= s.num_tokens <= 4
            assert all(lp <= 0.0 for lp in s.token_logprobs)
            assert s.finish_reason in ("stop", "length")
    # A random model almost never picks EOS, so answers run to max_tokens.
    assert sum(s.finish_reason == "length" for samples in out for s in samples) >= 8


def test_seed_makes_sampling_reproducible(tiny):
    prompts = [Prompt("a", text="Once upon a time"), Prompt("b", text="Hi")]
    params = SamplingParams(n=2, max_tokens=6, seed=123)
    first, again = tiny.sample(prompts, params), tiny.sample(prompts, params)
    other = tiny.sample(prompts, params.model_copy(update={"seed": 124}))
    assert [[s.text for s in x] for x in first] == [[s.text for s in x] for x in again]
    assert [[s.token_logprobs for s in x] for x in first] == [
        [s.token_logprobs for s in x] for x in again
    ]
    assert [[s.text for s in x] for x in first] != [[s.text for s in x] for x in other]


def test_a_bad_prompt_is_returned_as_an_error(tiny):
    too_long = Prompt("long", text="word " * 3000)  # the tiny model takes 2048 positions
    prompts = [Prompt("ok", text="Fine"), Prompt("empty"), too_long]
    out = tiny.sample(prompts, SamplingParams(n=1, max_tokens=2))
    assert len(out[0]) == 1 and out[0][0].num_tokens >= 1
    assert isinstance(out[1], EngineError) and out[1].prompt_id == "empty"
    assert isinstance(out[2], EngineError) and "2048" in out[2].reason
    assert isinstance(tiny.score(Prompt("empty"), ["x"]), EngineError)


def test_score_equals_a_direct_forward_pass(smol):
    answers = [
        " The capital of France is Paris.",
        " The capital of France is Berlin.",
        " I think it is Lyon, not Paris!",
    ]
    scored = smol.score(FRANCE, answers)
    prompt_ids = smol.tokenizer(FRANCE.text)["input_ids"]
    for answer, got in zip(answers, scored):
        ids = smol.tokenizer(FRANCE.text + answer)["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids  # clean boundary: the reference is exact
        expected = direct_logprobs(smol, ids, len(prompt_ids))
        assert got.num_tokens == len(expected)
        assert got.logprob_sum == pytest.approx(sum(expected), abs=1e-4)
    # The likelihood is the model's: the right answer beats the same sentence with a wrong one.
    assert scored[0].num_tokens == scored[1].num_tokens
    assert scored[0].logprob_sum > scored[1].logprob_sum + 1.0


def test_empty_answer_scores_zero_tokens(smol):
    (scored,) = smol.score(FRANCE, [""])
    assert (scored.logprob_sum, scored.num_tokens) == (0.0, 0)


def test_sample_logprobs_are_raw_and_match_rescoring(smol):
    """Tempered, top-p sampling still records the model's own (temperature-1) log-probs."""
    params = SamplingParams(n=3, temperature=0.7, top_p=0.9, max_tokens=10, seed=7)
    (result,) = smol.generate([FRANCE], params)
    (samples,) = smol.sample([FRANCE], params)
    assert [s.text for s in samples] == [g.text for g in result.generations]
    compared_text = 0
    for sample, gen in zip(samples, result.generations):
        # On token ids: exactly the sampled sequence, no tokenisation round trip.
        reference = direct_logprobs(smol, result.prompt_ids + gen.token_ids, len(result.prompt_ids))
        assert sample.token_logprobs == pytest.approx(reference, abs=2e-3)
        assert sample.logprob_sum == pytest.approx(sum(reference), abs=5e-3)
        # On text: score() re-tokenises prompt + text; compare where that gives the same ids.
        joint = smol.tokenizer(FRANCE.text + sample.text)["input_ids"]
        if joint == result.prompt_ids + gen.token_ids:
            (rescored,) = smol.score(FRANCE, [sample.text])
            assert rescored.num_tokens == sample.num_tokens
            assert rescored.logprob_sum == pytest.approx(sample.logprob_sum, abs=5e-3)
            compared_text += 1
    assert compared_text >= 1


def test_chat_messages_stop_at_eos_which_is_left_out(smol):
    prompt = Prompt(
        "chat", messages=({"role": "user", "content": "What is the capital of France?"},)
    )
    (result,) = smol.generate([prompt], SamplingParams(n=2, temperature=0.0, max_tokens=40))
    first, second = result.generations
    assert "Paris" in first.text
    assert first.finish_reason == "stop"
    assert not set(first.token_ids) & set(smol.eos_ids)
    assert "<|im_end|>" not in first.text
    assert len(first.token_logprobs) == len(first.token_ids) < 40
    assert (second.text, second.token_logprobs) == (first.text, first.token_logprobs)  # greedy


def test_stop_string_cuts_the_text(smol):
    prompt = Prompt("p", text="The capital of France is")
    (samples,) = smol.sample([prompt], SamplingParams(n=1, temperature=0.0, max_tokens=20))
    (stopped,) = smol.sample(
        [prompt], SamplingParams(n=1, temperature=0.0, max_tokens=20, stop=(".",))
    )
    assert "." in samples[0].text
    assert stopped[0].text == samples[0].text.split(".")[0]
    assert stopped[0].finish_reason == "stop"
    assert stopped[0].token_logprobs == samples[0].token_logprobs[: stopped[0].num_tokens]


def test_usage_counts_tokens(tiny):
    before = tiny.usage().completion_tokens
    out = tiny.sample([Prompt("a", text="Count me")], SamplingParams(n=2, max_tokens=3, seed=1))
    assert tiny.usage().completion_tokens - before == sum(s.num_tokens for s in out[0])
