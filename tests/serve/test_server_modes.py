"""The scripted server modes (fixed, judge) over real loopback HTTP with the official client."""

from __future__ import annotations

import asyncio
import json
import re
import time

import openai
import pytest

from tuna_ray.data.templates import ALPACA_PROMPT_NO_INPUT
from tuna_ray.engines.base import Prompt, SamplingParams
from tuna_ray.engines.openai_engine import OpenAIEngine, OpenAIEngineConfig
from tuna_ray.serve.local import start_local_server
from tuna_ray.serve.scripted import REFERENCE_PREFIX

DELAY = 0.5
INSTRUCTION = "Give three tips for staying healthy."
# Lengths 40, 7, 25, 7 (a duplicate of 1), 60; the reference is 22 + 36 = 58 characters.
RESPONSES = ["x" * 40, "short a", "a medium-length response.", "short a", "y" * 60]


@pytest.fixture(scope="module")
def fixed():
    with start_local_server(mode="fixed", fixed_delay_s=DELAY) as running:
        yield running


@pytest.fixture(scope="module")
def judges():
    servers = {}
    try:
        for rule in ("length", "reverse_length", "index"):
            servers[rule] = start_local_server(mode="judge", judge_rule=rule)
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def client(server, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, **kw)


def judge_prompt(responses: list[str]) -> str:
    """METHOD.md's judge prompt (verbatim wording, generalised to len(responses) answers)."""
    n = len(responses)
    shown = "/".join(map(str, range(n)))
    blocks = "\n\n".join(f"###Response {k}:\n{r}" for k, r in enumerate(responses))
    return (
        f"{ALPACA_PROMPT_NO_INPUT.format(instruction=INSTRUCTION)}\n\n{blocks}\n\n\n"
        f"We would like you to rate Response {shown} in reply to the given instruction displayed "
        "above.\nFirst, identify if the instruction requires open-ended or close-ended responses."
        f"Second, you need to generate one high quality '###Response {n}' in answer to the "
        "instruction. ...\nLast, rank the responses in decreasing order of their overall scores. "
        "The ranking should have the format: 'rank: [i, j ,k, l, m]'."
    )


def ask_judge(server, responses, **kw):
    messages = [
        {"role": "system", "content": "You are a professional and experienced data annotator."},
        {"role": "user", "content": judge_prompt(responses)},
    ]
    return client(server).chat.completions.create(model="judge", messages=messages, **kw)


# ---- fixed ----------------------------------------------------------------------------------


def test_fixed_mode_answers_requests_concurrently(fixed):
    async def burst() -> float:
        c = openai.AsyncOpenAI(base_url=fixed.base_url, api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "hello"}]
        started = time.monotonic()
        replies = await asyncio.gather(
            *(c.chat.completions.create(model="fixed", messages=messages, seed=i) for i in range(8))
        )
        await c.close()
        assert all(r.choices[0].message.content for r in replies)
        return time.monotonic() - started

    fixed.reset_stats()
    elapsed = asyncio.run(burst())
    assert DELAY <= elapsed < 2.5 < 8 * DELAY
    stats = fixed.stats()
    assert stats["requests"] == 8 and stats["max_in_flight"] >= 4
    assert 0 <= stats["last_request_at"] - stats["first_request_at"] < DELAY


def test_fixed_mode_returns_n_answers_with_logprobs(fixed):
    messages = [{"role": "user", "content": "Name a colour."}]
    reply = client(fixed).chat.completions.create(
        model="fixed", messages=messages, n=3, logprobs=True, top_logprobs=2
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) == 3
    for choice in reply.choices:
        content = choice.logprobs.content
        assert "".join(e.token for e in content) == choice.message.content
        for entry in content:
            assert -3.1 < entry.logprob < 0 and bytes(entry.bytes).decode() == entry.token
            assert len(entry.top_logprobs) == 2
            assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    assert reply.usage.completion_tokens == sum(len(c.logprobs.content) for c in reply.choices)
    again = client(fixed).chat.completions.create(model="fixed", messages=messages, n=3)
    assert [c.message.content for c in again.choices] == [c.message.content for c in reply.choices]


def test_fixed_mode_completions_max_tokens_and_echo(fixed):
    reply = client(fixed).completions.create(
        model="fixed", prompt=["Q: one?\nA:", "Q: two?\nA:"], n=2, max_tokens=3, logprobs=1
    )
    assert sorted(c.index for c in reply.choices) == [0, 1, 2, 3]
    for choice in reply.choices:
        assert len(choice.logprobs.tokens) == 3 and choice.finish_reason == "length"
        assert "".join(choice.logprobs.tokens) == choice.text
    scored = client(fixed).completions.create(
        model="fixed", prompt="Q: one?\nA: yes", max_tokens=0, echo=True, logprobs=0
    )
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == "Q: one?\nA: yes"
    assert lp.token_logprobs[0] is None and all(x < 0 for x in lp.token_logprobs[1:])


def test_engine_samples_and_rescores_consistently_under_faults(fixed):
    fixed.set_faults(0.4, ["500", "drop", "malformed", "no_logprobs"], seed=1)
    try:
        config = OpenAIEngineConfig(
            base_url=fixed.base_url,
            model="fixed",
            endpoint="completions",
            max_concurrency=8,
            backoff_base_s=0.01,
            backoff_max_s=0.05,
        )
        engine = OpenAIEngine(config)
        prompts = [Prompt(f"p{i}", text=f"Question {i}?\nAnswer:") for i in range(6)]
        results = engine.sample(prompts, SamplingParams(n=2, max_tokens=64))
        assert engine.usage().retries > 0 and fixed.stats()["faults"]
        fixed.set_faults(0.0)
        for prompt, samples in zip(prompts, results):
            assert len(samples) == 2
            scores = engine.score(prompt, [s.text for s in samples])
            for sample, score in zip(samples, scores):
                assert score.num_tokens == sample.num_tokens
                assert score.logprob_sum == pytest.approx(sample.logprob_sum)
    finally:
        fixed.set_faults(0.0)


def test_fixed_mode_faults_still_apply(fixed):
    fixed.set_faults(1.0, ["429"])
    fixed.reset_stats()
    try:
        with pytest.raises(openai.RateLimitError):
            client(fixed).completions.create(model="fixed", prompt="x", max_tokens=1)
        fixed.set_faults(1.0, ["no_logprobs"])
        messages = [{"role": "user", "content": "x"}]
        reply = client(fixed).chat.completions.create(
            model="fixed", messages=messages, logprobs=True
        )
        assert reply.choices[0].logprobs is None
        assert fixed.stats()["requests"] == 2
    finally:
        fixed.set_faults(0.0)


# ---- judge ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "ranking"),
    [("length", [4, 5, 0, 2, 1]), ("reverse_length", [1, 2, 0, 5, 4]), ("index", [0, 1, 2, 4, 5])],
)
def test_judge_ranks_by_rule_in_the_paper_format(judges, rule, ranking):
    reply = ask_judge(judges[rule], RESPONSES, n=2)
    assert len(reply.choices) == 2
    text = reply.choices[0].message.content
    assert text == reply.choices[1].message.content
    assert f"###Response 5:\n{REFERENCE_PREFIX}{INSTRUCTION}\n" in text
    assert text.splitlines()[-1] == f"rank: [{', '.join(map(str, ranking))}]"
    lines = re.findall(r"^Response (\d+): (\d+)$", text, re.MULTILINE)
    scores = {int(k): int(s) for k, s in lines}
    assert sorted(scores) == [0, 1, 2, 3, 4, 5]
    assert scores[3] == scores[1]  # the duplicate scores like its kept twin
    assert [scores[k] for k in ranking] == sorted(scores[k] for k in ranking)[::-1]


def test_judge_json_variant_and_logprobs(judges):
    response_format = {"type": "json_schema", "json_schema": {"name": "ranking", "schema": {}}}
    reply = ask_judge(judges["length"], RESPONSES, response_format=response_format, logprobs=True)
    body = json.loads(reply.choices[0].message.content)
    assert body["ranking"] == [4, 5, 0, 2, 1]
    assert body["reference_answer"] == REFERENCE_PREFIX + INSTRUCTION
    assert body["instruction_type"] == "open-ended"
    assert [s["response"] for s in body["scores"]] == [0, 1, 2, 4, 5]
    content = reply.choices[0].logprobs.content
    assert "".join(e.token for e in content) == reply.choices[0].message.content
    assert all(e.logprob < 0 for e in content)


def test_judge_refuses_what_is_not_a_judge_prompt(judges):
    c = client(judges["length"])
    with pytest.raises(openai.BadRequestError, match="Response k"):
        c.chat.completions.create(model="judge", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="chat/completions only"):
        c.completions.create(model="judge", prompt="x", max_tokens=1)


@pytest.mark.parametrize("template", ["paper_v1", "json_v1"])
def test_judge_round_trips_with_the_contextual_ranking_core(judges, template):
    from tuna_ray.ranking.contextual import load_judge_template, render_judge_messages
    from tuna_ray.ranking.judge_reply import parse_judge_reply

    prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=INSTRUCTION)
    messages = render_judge_messages(prompt, RESPONSES, template=template)
    extra = {}
    if (response_format := load_judge_template(template).response_format) is not None:
        extra["response_format"] = response_format
    reply = client(judges["length"]).chat.completions.create(
        model="judge", messages=messages, **extra
    )
    parsed = parse_judge_reply(reply.choices[0].message.content, len(RESPONSES), template=template)
    assert parsed.ranking == [4, 5, 0, 2, 1]
    assert parsed.reference_answer == REFERENCE_PREFIX + INSTRUCTION
