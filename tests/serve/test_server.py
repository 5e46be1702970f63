"""The local OpenAI-compatible server, over real loopback HTTP with the official openai client."""

from __future__ import annotations

import json
import time

import openai
import pytest

from tuna_ray.engines.base import Prompt
from tuna_ray.engines.hf import HFEngine
from tuna_ray.serve.local import start_local_server

MODEL = "tiny"  # served model name


@pytest.fixture(scope="session")
def server(tiny_model_path):
    with start_local_server(str(tiny_model_path), served_model_name=MODEL) as running:
        yield running


@pytest.fixture(scope="session")
def fault_server(tiny_model_path):
    with start_local_server(
        str(tiny_model_path),
        served_model_name=MODEL,
        fault_rate=1.0,
        fault_kinds=("429",),
        fault_seed=5,
        slow_seconds=2.0,
    ) as running:
        running.started_with = running._call("GET", "/admin/faults")
        yield running


def client(server, **kw) -> openai.OpenAI:
    kw.setdefault("max_retries", 0)
    kw.setdefault("timeout", 60.0)
    return openai.OpenAI(base_url=server.base_url, api_key="unused", **kw)


def chat(c: openai.OpenAI, **kw):
    messages = [{"role": "user", "content": "Say something."}]
    return c.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, **kw)


def test_binds_loopback_and_lists_the_model(server):
    assert server.base_url.startswith("http://127.0.0.1:")
    models = client(server).models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_chat_n3_with_logprobs(server):
    reply = chat(client(server), n=3, logprobs=True, top_logprobs=2, seed=1)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    total = 0
    for choice in reply.choices:
        content = choice.logprobs.content
        assert len(content) >= 1 and choice.finish_reason in ("stop", "length")
        for entry in content:
            assert entry.logprob <= 0.0
            assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
            assert len(entry.top_logprobs) == 2
            assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
            assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6
        total += len(content)
    assert reply.usage.completion_tokens == total
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + total > total


def test_completions_n3_with_logprobs_for_two_prompts(server):
    prompts = ["The capital of France is", "Once upon a time"]
    reply = client(server).completions.create(
        model=MODEL, prompt=prompts, n=3, max_tokens=5, logprobs=2, seed=0
    )
    assert sorted(c.index for c in reply.choices) == list(range(6))
    for choice in reply.choices:
        lp = choice.logprobs
        prompt = prompts[choice.index // 3]
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) >= 1
        assert lp.text_offset[0] == len(prompt)
        assert lp.text_offset == sorted(lp.text_offset)
        assert all(len(alts) <= 2 for alts in lp.top_logprobs)
        if not any("\ufffd" in t for t in lp.tokens):  # partial UTF-8 pieces aside
            assert "".join(lp.tokens) == choice.text
    assert reply.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in reply.choices)


def test_seed_reproduces_over_http(server):
    c = client(server)
    first, again = chat(c, n=2, seed=42), chat(c, n=2, seed=42)
    assert [x.message.content for x in first.choices] == [x.message.content for x in again.choices]


def test_echo_scores_a_given_answer_like_the_engine(server, tiny_model_path):
    prompt, answer = "Question: what is two plus two?\nAnswer:", " Four, of course."
    reply = client(server).completions.create(
        model=MODEL, prompt=prompt + answer, max_tokens=0, echo=True, logprobs=0
    )
    lp = reply.choices[0].logprobs
    assert reply.choices[0].text == prompt + answer
    assert lp.token_logprobs[0] is None
    ends = lp.text_offset[1:] + [len(prompt + answer)]
    answer_lps = [x for x, end in zip(lp.token_logprobs, ends) if end > len(prompt)]
    (expected,) = HFEngine(str(tiny_model_path)).score(Prompt("q", text=prompt), [answer])
    assert len(answer_lps) == expected.num_tokens >= 3
    assert sum(answer_lps) == pytest.approx(expected.logprob_sum, abs=1e-4)


def test_bad_requests_get_openai_errors(server):
    c = client(server)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=MODEL, prompt="x", max_tokens=1, n=0)


def test_stats_count_inference_requests_and_reset(server):
    server.reset_stats()
    c = client(server)
    chat(c)
    c.completions.create(model=MODEL, prompt="x", max_tokens=1)
    c.models.list()  # a GET: not counted
    stats = server.stats()
    assert stats["requests"] == 2
    assert stats["by_path"] == {"/v1/chat/completions": 1, "/v1/completions": 1}
    assert stats["faults"] == {}
    server.reset_stats()
    assert server.stats()["requests"] == 0


# ---- fault injection ------------------------------------------------------------------------


def test_fault_flags_reach_the_server(fault_server):
    started = fault_server.started_with
    assert (started["rate"], started["kinds"], started["seed"]) == (1.0, ["429"], 5)
    assert started["slow_seconds"] == 2.0


def test_429_carries_retry_after_and_the_client_retries(fault_server):
    fault_server.set_faults(1.0, ["429"])
    fault_server.reset_stats()
    with pytest.raises(openai.RateLimitError) as err:
        chat(client(fault_server))
    assert err.value.status_code == 429
    assert err.value.response.headers["retry-after"] == "1"
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError):
        chat(client(fault_server, max_retries=1))
    assert time.monotonic() - started >= 0.9  # honoured Retry-After: 1
    assert fault_server.stats()["requests"] == 3
    assert fault_server.stats()["faults"] == {"429": 3}


def test_500_is_an_internal_server_error(fault_server):
    fault_server.set_faults(1.0, ["500"])
    with pytest.raises(openai.InternalServerError) as err:
        client(fault_server).completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert err.value.status_code == 500


def test_slow_answer_times_the_client_out(fault_server):
    fault_server.set_faults(1.0, ["slow"], slow_seconds=2.0)
    with pytest.raises(openai.APITimeoutError):
        chat(client(fault_server, timeout=0.5))


def test_dropped_connection_is_a_connection_error(fault_server):
    fault_server.set_faults(1.0, ["drop"])
    with pytest.raises(openai.APIConnectionError) as err:
        chat(client(fault_server))
    assert not isinstance(err.value, openai.APITimeoutError)


def test_malformed_body_fails_to_parse(fault_server):
    fault_server.set_faults(1.0, ["malformed"])
    with pytest.raises(json.JSONDecodeError):
        chat(client(fault_server))


def test_no_logprobs_returns_a_valid_answer_without_them(fault_server):
    fault_server.set_faults(1.0, ["no_logprobs"])
    reply = chat(client(fault_server), n=2, logprobs=True)
    assert len(reply.choices) == 2
    assert all(isinstance(c.message.content, str) for c in reply.choices)
    assert all(c.logprobs is None for c in reply.choices)


def test_faults_are_seeded_and_counted(fault_server):
    fault_server.set_faults(0.5, ["500"], seed=3)
    c = client(fault_server)

    def outcomes() -> list[bool]:
        fault_server.reset_stats()  # re-seeds: the same sequence again
        result = []
        for _ in range(12):
            try:
                c.completions.create(model=MODEL, prompt="x", max_tokens=1)
                result.append(True)
            except openai.InternalServerError:
                result.append(False)
        return result

    first = outcomes()
    assert fault_server.stats()["faults"] == {"500": first.count(False)}
    assert outcomes() == first
    assert 0 < first.count(False) < 12
