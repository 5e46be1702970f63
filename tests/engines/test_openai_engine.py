"""The openai engine: pacing and parsing on their own, then the real client over real HTTP.

End-to-end tests talk to ``tuna-ray serve`` (a tiny random llama) through the official async
client; faults (429 with Retry-After, 500, slow answers, dropped connections, truncated JSON,
missing log-probs) come from the server, never from patching our code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import pickle
import random
import subprocess
import sys
import time

import pytest

from tuna_ray.engines.base import EngineError, Prompt, SamplingParams
from tuna_ray.engines.cache import ResponseCache, cache_key
from tuna_ray.engines.openai_engine import (
    LOOPBACK_DUMMY_KEY,
    MissingAPIKeyError,
    OpenAIEngine,
    OpenAIEngineConfig,
    resolve_api_key,
)
from tuna_ray.engines.openai_parse import (
    BadResponse,
    parse_chat,
    parse_completions,
    parse_echo_score,
    parse_echo_scores,
)
from tuna_ray.engines.retry import (
    RETRY_AFTER_CAP_S,
    AdaptiveTimeout,
    IntervalLimiter,
    backoff_delay,
    parse_retry_after,
)

MODEL = "tiny"
PROMPTS = [Prompt(id=f"p{i}", text=f"Instruction {i}: name a colour.") for i in range(6)]

# ---- pacing -----------------------------------------------------------------------------------


def test_limiter_spaces_reservations_evenly():
    now = [100.0]
    limiter = IntervalLimiter(10.0, clock=lambda: now[0])
    assert [round(limiter.reserve(), 6) for _ in range(4)] == [0.0, 0.1, 0.2, 0.3]
    now[0] = 101.0  # idle for a while: no burst credit builds up beyond one slot
    assert [round(limiter.reserve(), 6) for _ in range(2)] == [0.0, 0.1]
    assert IntervalLimiter(None).reserve() == 0.0


def test_limiter_bounds_real_rate():
    limiter = IntervalLimiter(50.0)

    async def burst() -> list[float]:
        async def one() -> float:
            await limiter.acquire()
            return time.monotonic()

        return await asyncio.gather(*(one() for _ in range(11)))

    stamps = sorted(asyncio.run(burst()))
    # A late wake-up can bunch two observed stamps together, but no start comes early: the
    # span of 11 starts is at least 10 intervals (exact spacing: the fake-clock test).
    assert stamps[-1] - stamps[0] >= 10 / 50 - 0.01


def test_backoff_full_jitter_bounds():
    rng = random.Random(0)
    for attempt in range(10):
        ceiling = min(8.0, 0.5 * 2**attempt)
        delays = [backoff_delay(attempt, 0.5, 8.0, rng=rng) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > 0.7 * ceiling  # spread over the whole range, not a fixed step
    assert backoff_delay(10_000, 0.5, 8.0, rng=rng) <= 8.0  # no overflow for huge attempts
    assert backoff_delay(0, 0.5, 8.0, retry_after=3.0, rng=rng) >= 3.0  # Retry-After is a floor
    assert backoff_delay(0, 0.5, 8.0, retry_after=1e9, rng=rng) == RETRY_AFTER_CAP_S


def test_adaptive_timeout_follows_observed_latency_and_backs_off():
    fixed = AdaptiveTimeout(2.0, None)
    fixed.observe(30.0)
    fixed.timed_out(2.0)
    assert fixed.timeout() == 2.0  # no max_timeout_s: never adapts
    t = AdaptiveTimeout(2.0, 100.0, factor=4.0, window=3)
    t.observe(0.1)  # a fast endpoint keeps the configured timeout
    assert t.timeout() == 2.0
    t.observe(5.0)  # a slow one earns patience: 4x its slowest recent answer
    assert t.timeout() == 20.0
    for _ in range(3):  # the window forgets old slow answers
        t.observe(1.0)
    assert t.timeout() == 4.0
    t.timed_out(4.0)  # a round of timeouts: every later attempt is 4x more patient
    t.timed_out(4.0)
    assert t.timeout() == 16.0
    t.timed_out(16.0)
    assert t.timeout() == 64.0
    t.timed_out(64.0)
    assert t.timeout() == 100.0  # never beyond max_timeout_s


def test_parse_retry_after():
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after": "0.5"}) == 0.5
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    date = "Wed, 21 Oct 2015 07:28:30 GMT"
    assert parse_retry_after({"retry-after": date}, now=1445412480.0) == 30.0
    assert parse_retry_after({"retry-after": date}, now=1445412600.0) == 0.0  # in the past
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({"retry-after": "-3"}) is None
    assert parse_retry_after({}) is None and parse_retry_after(None) is None


# ---- parsing: a missing log-prob is a failure, never a score ----------------------------------


def _chat(logprobs, text="hi", n=1):
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs}
    return {"choices": [dict(choice, index=i) for i in range(n)]}


def test_parse_chat_requires_logprobs():
    ok = _chat({"content": [{"token": "hi", "logprob": -0.5}]}, n=2)
    assert [s["token_logprobs"] for s in parse_chat(ok, 2, require_logprobs=True)] == [[-0.5]] * 2
    for bad in (
        None,
        {"content": None},
        {"content": []},
        {"content": [{"logprob": None}]},
        {"content": [{"logprob": float("nan")}]},
        {"content": ["x"]},
    ):
        with pytest.raises(BadResponse, match="missing logprobs"):
            parse_chat(_chat(bad), 1, require_logprobs=True)
    assert parse_chat(_chat(None), 1, require_logprobs=False)[0]["token_logprobs"] is None
    assert (
        parse_chat(_chat({"content": []}, text=""), 1, require_logprobs=True)[0]["token_logprobs"]
        == []
    )
    with pytest.raises(BadResponse, match="malformed"):
        parse_chat(_chat(None, n=1), 2, require_logprobs=False)  # fewer choices than n
    with pytest.raises(BadResponse, match="malformed"):
        parse_chat({"choices": [{"message": {"content": None}}]}, 1, require_logprobs=False)


def test_parse_completions_requires_logprobs():
    choice = {"index": 0, "text": " red", "logprobs": {"token_logprobs": [-1.0, -0.5]}}
    assert parse_completions({"choices": [choice]}, 1)[0]["token_logprobs"] == [-1.0, -0.5]
    with pytest.raises(BadResponse, match="missing logprobs"):
        parse_completions({"choices": [dict(choice, logprobs=None)]}, 1)
    with pytest.raises(BadResponse, match="missing logprobs"):
        parse_completions({"choices": [dict(choice, logprobs={"token_logprobs": [None]})]}, 1)


def test_stop_token_logprob_is_not_an_answer_token():
    """vLLM lists the EOS it stopped at ("" with special tokens skipped, or "</s>"); OpenAI and
    the hf engine do not. Every engine's answer scores cover the answer's tokens only."""
    vllm_chat = {
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi there"},
                "finish_reason": "stop",
                "logprobs": {
                    "content": [
                        {"token": "Hi", "logprob": -1.0, "bytes": [72, 105]},
                        {"token": " there", "logprob": -0.5, "bytes": [32]},
                        {"token": "", "logprob": -0.1, "bytes": []},
                    ]
                },
            }
        ]
    }
    assert parse_chat(vllm_chat, 1, require_logprobs=True)[0]["token_logprobs"] == [-1.0, -0.5]

    def completion(tokens, values, text, finish="stop"):
        logprobs = {"tokens": tokens, "token_logprobs": values}
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}
        return parse_completions({"choices": [choice]}, 1)[0]["token_logprobs"]

    assert completion([" red", "</s>"], [-1.0, -0.2], " red") == [-1.0]
    assert completion([" red", "<|eot_id|>"], [-1.0, -0.2], " red") == [-1.0]
    assert completion([" red", "</s>"], [-1.0, -0.2], " red", finish="length") == [-1.0, -0.2]
    assert completion([" a", " <b>"], [-1.0, -0.2], " a <b>") == [-1.0, -0.2]  # it is the text
    assert completion([" red", "."], [-1.0, -0.2], " red.") == [-1.0, -0.2]  # OpenAI: no EOS
    assert completion(["</s>"], [-0.3], "") == []  # stopped at once: an empty answer


def test_parse_echo_score_uses_text_offsets():
    # "Q: hi\nA:" + " yes no" = tokens "" (BOS) "Q:" " hi" "\nA:" " yes" " no"
    logprobs = {
        "tokens": ["", "Q:", " hi", "\nA:", " yes", " no"],
        "text_offset": [0, 0, 2, 5, 8, 12],
        "token_logprobs": [None, -3.0, -2.0, -1.0, -0.5, -0.25],
    }
    raw = {"choices": [{"text": "Q: hi\nA: yes no", "logprobs": logprobs}]}
    assert parse_echo_score(raw, 8, 15) == {"logprob_sum": -0.75, "num_tokens": 2}
    # a token straddling the join (prompt ends in "A: ", response "yes no") belongs to the answer
    assert parse_echo_score(raw, 9, 15) == {"logprob_sum": -0.75, "num_tokens": 2}
    assert parse_echo_score(raw, 15, 15) == {"logprob_sum": 0.0, "num_tokens": 0}
    with pytest.raises(BadResponse, match="missing logprobs"):
        parse_echo_score(
            {"choices": [{"logprobs": dict(logprobs, token_logprobs=[None] * 6)}]}, 8, 15
        )
    with pytest.raises(BadResponse):
        parse_echo_score({"choices": [{"logprobs": dict(logprobs, text_offset=[0, 1])}]}, 8, 15)
    # several responses echoed in one request (a list of prompts): one choice each, by index
    short = {
        "tokens": ["", "Q:", " hi", "\nA:", " no"],
        "text_offset": [0, 0, 2, 5, 8],
        "token_logprobs": [None, -3.0, -2.0, -1.0, -0.25],
    }
    two = {"choices": [{"index": 1, "logprobs": short}, {"index": 0, "logprobs": logprobs}]}
    assert parse_echo_scores(two, 8, [15, 11]) == [
        {"logprob_sum": -0.75, "num_tokens": 2},
        {"logprob_sum": -0.25, "num_tokens": 1},
    ]
    with pytest.raises(BadResponse, match="malformed"):
        parse_echo_scores(two, 8, [15])  # a choice per response, no more, no less


# ---- cache ------------------------------------------------------------------------------------


def test_cache_key_stable_and_separating():
    parts = {
        "base_url": "http://h/v1",
        "model": "m",
        "endpoint": "chat",
        "request": {"messages": [{"role": "user", "content": "hi"}], "n": 2, "seed": 1},
        "template_version": "v1",
    }
    key = cache_key(**parts)
    assert key == cache_key(**dict(reversed(list(parts.items()))))
    assert len(key) == 64
    changed = [
        dict(parts, base_url="http://other/v1"),
        dict(parts, model="m2"),
        dict(parts, endpoint="completions"),
        dict(parts, template_version="v2"),
        dict(parts, request=dict(parts["request"], n=3)),
        dict(parts, request=dict(parts["request"], seed=2)),
        dict(parts, request=dict(parts["request"], messages=[{"role": "user", "content": "ho"}])),
    ]
    assert len({key, *(cache_key(**c) for c in changed)}) == len(changed) + 1


def test_cache_roundtrip_and_pickle(tmp_path):
    cache = ResponseCache(tmp_path)
    assert cache.get("k") is None
    cache.put("k", [{"text": "é", "token_logprobs": [-1.5]}])
    clone = pickle.loads(pickle.dumps(cache))
    assert clone.get("k") == [{"text": "é", "token_logprobs": [-1.5]}] and len(clone) == 1


_WRITER = """
import sys
from tuna_ray.engines.cache import ResponseCache
cache = ResponseCache(sys.argv[1])
tag = sys.argv[2]
for i in range(300):
    cache.put(f"{tag}-{i}", {"i": i, "tag": tag})
    assert cache.get(f"{tag}-{i}") == {"i": i, "tag": tag}
"""


def test_cache_concurrent_writers_in_several_processes(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), tag]) for tag in "ab"]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    cache = ResponseCache(tmp_path)
    assert len(cache) == 600
    assert cache.get("a-299") == {"i": 299, "tag": "a"} and cache.get("b-0")["tag"] == "b"


# ---- keys -------------------------------------------------------------------------------------


def test_api_key_resolution(monkeypatch):
    monkeypatch.delenv("TUNA_TEST_NO_SUCH_KEY", raising=False)
    local = OpenAIEngineConfig(
        base_url="http://127.0.0.1:9/v1", model="m", api_key_env="TUNA_TEST_NO_SUCH_KEY"
    )
    assert resolve_api_key(local) == LOOPBACK_DUMMY_KEY
    remote = local.model_copy(update={"base_url": "https://api.example.com/v1"})
    with pytest.raises(MissingAPIKeyError, match="TUNA_TEST_NO_SUCH_KEY"):
        OpenAIEngine(remote)
    monkeypatch.setenv("TUNA_TEST_NO_SUCH_KEY", "sk-from-env-31d8")
    assert resolve_api_key(remote) == "sk-from-env-31d8"
    # engines travel to Ray actors pickled: the key stays in the environment, not the bytes
    blob = pickle.dumps(OpenAIEngine(remote))
    assert b"sk-from-env-31d8" not in blob and pickle.loads(blob).config == remote
    with pytest.raises(ValueError):
        OpenAIEngineConfig(model="m", api_key="sk-in-config")  # keys never go in configs


def test_connection_errors_are_retried_then_named(unused_port_url):
    engine = OpenAIEngine(
        OpenAIEngineConfig(
            base_url=unused_port_url, model=MODEL, max_retries=2, backoff_base_s=0.01, timeout_s=2
        )
    )
    (result,) = engine.sample(PROMPTS[:1], SamplingParams(n=1, max_tokens=4))
    assert isinstance(result, EngineError) and result.reason == "connection error"
    usage = engine.usage()
    assert (usage.requests, usage.retries, usage.failures) == (3, 2, {"connection error": 1})


@pytest.fixture
def unused_port_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


# ---- end to end against tuna-ray serve ---------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_model_path):
    from tuna_ray.serve.local import start_local_server

    with start_local_server(str(tiny_model_path), served_model_name=MODEL) as srv:
        yield srv


@pytest.fixture
def fresh(server):
    server.set_faults(0.0)
    server.reset_stats()
    yield server
    server.set_faults(0.0)


def _engine(server, **overrides) -> OpenAIEngine:
    fields = {"base_url": server.base_url, "model": MODEL, "backoff_base_s": 0.05, "timeout_s": 30}
    return OpenAIEngine(OpenAIEngineConfig(**(fields | overrides)))


def _assert_samples(result, n):
    assert not isinstance(result, EngineError), result
    assert len(result) == n
    for sample in result:
        assert sample.num_tokens > 0
        assert all(math.isfinite(v) and v <= 0 for v in sample.token_logprobs)


@pytest.mark.slow
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_sampling_gives_n_samples_with_logprobs(fresh, endpoint):
    engine = _engine(fresh, endpoint=endpoint)
    results = engine.sample(PROMPTS[:3], SamplingParams(n=3, max_tokens=6, seed=1))
    for result in results:
        _assert_samples(result, 3)
    assert fresh.stats()["requests"] == 3  # n in one request
    usage = engine.usage()
    assert usage.requests == 3 and 0 < usage.completion_tokens <= 3 * 3 * 6 and usage.prompt_tokens


@pytest.mark.slow
def test_cached_rerun_sends_nothing(fresh, tmp_path):
    config = {
        "cache_dir": str(tmp_path / "cache"),
        "price_per_1m_input": 1.0,
        "price_per_1m_output": 2.0,
    }
    params = SamplingParams(n=2, max_tokens=5, seed=3)
    first_engine = _engine(fresh, **config)
    first = first_engine.sample(PROMPTS, params)
    judged = first_engine.complete_chat(PROMPTS[:2], params)
    scored = first_engine.score(PROMPTS[0], [" red", " blue"])
    sent = fresh.stats()["requests"]
    assert sent == len(PROMPTS) + 2 + 1  # both answers are scored in one echo request
    cost = first_engine.usage().cost_usd
    assert cost > 0

    again = _engine(fresh, **config)  # a new process would see the same: the cache is on disk
    assert again.sample(PROMPTS, params) == first
    assert again.complete_chat(PROMPTS[:2], params) == judged
    assert again.score(PROMPTS[0], [" red", " blue"]) == scored
    assert fresh.stats()["requests"] == sent
    usage = again.usage()
    assert (usage.requests, usage.cached, usage.cost_usd) == (0, len(PROMPTS) + 3, 0.0)
    # anything that decides the answer is part of the key
    _engine(fresh, **config, template_version="v2").sample(PROMPTS[:1], params)
    assert fresh.stats()["requests"] == sent + 1


@pytest.mark.slow
def test_faults_end_in_samples_or_named_errors(fresh):
    fresh.set_faults(0.3, seed=7, slow_seconds=3.0)
    engine = _engine(fresh, max_retries=6, timeout_s=1.5, max_concurrency=4)
    prompts = [Prompt(id=f"f{i}", text=f"Fault test {i}") for i in range(24)]
    results = engine.sample(prompts, SamplingParams(n=2, max_tokens=4))
    assert len(results) == len(prompts)
    known = {
        "http 429",
        "http 500",
        "timeout",
        "connection error",
        "malformed response",
        "missing logprobs",
    }
    for prompt, result in zip(prompts, results, strict=True):
        if isinstance(result, EngineError):
            assert result.reason in known and result.prompt_id == prompt.id
        else:
            _assert_samples(result, 2)
    stats, usage = fresh.stats(), engine.usage()
    assert len(stats["faults"]) >= 4 and usage.retries >= sum(stats["faults"].values()) - 1
    assert usage.requests == stats["requests"]  # every attempt reached the server and counted
    assert sum(usage.failures.values()) == sum(isinstance(r, EngineError) for r in results)


FAULT_REASONS = {
    "429": "http 429",
    "500": "http 500",
    "slow": "timeout",
    "drop": "connection error",
    "malformed": "malformed response",
    "no_logprobs": "missing logprobs",
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(FAULT_REASONS))
def test_each_fault_is_retried_then_named(fresh, kind):
    fresh.set_faults(1.0, [kind], slow_seconds=2.0)  # every attempt fails this way
    # A slow answer must time out on the retry too: a fixed 1 s timeout (no max_timeout_s)
    # there; the others get time to spare on a busy machine.
    timing = {"timeout_s": 1.0, "max_timeout_s": None} if kind == "slow" else {"timeout_s": 30}
    engine = _engine(fresh, max_retries=1, backoff_base_s=0.01, **timing)
    start = time.monotonic()
    (result,) = engine.sample(PROMPTS[:1], SamplingParams(n=2, max_tokens=4))
    elapsed = time.monotonic() - start
    assert isinstance(result, EngineError) and result.reason == FAULT_REASONS[kind]
    assert fresh.stats()["requests"] == 2  # one try, one retry
    usage = engine.usage()
    assert (usage.requests, usage.retries, usage.failures) == (2, 1, {FAULT_REASONS[kind]: 1})
    if kind == "429":
        assert elapsed >= 1.0  # the server's Retry-After: 1 was honoured
    if kind == "no_logprobs":  # plain-text judging does not need log-probs: these answers do
        (texts,) = engine.complete_chat(PROMPTS[:1], SamplingParams(n=1, max_tokens=4))
        assert not isinstance(texts, EngineError) and len(texts) == 1


@pytest.mark.slow
def test_slow_endpoint_gets_patience_instead_of_failures(fresh):
    """A server slower than timeout_s: after a timeout, attempts wait 4x as long; once an
    answer came back slow, every attempt waits 4x that long."""
    fresh.set_faults(1.0, ["slow"], slow_seconds=1.0)  # every answer takes over a second
    engine = _engine(fresh, timeout_s=0.4, max_timeout_s=60, max_retries=5, backoff_base_s=0)
    (first,) = engine.sample(PROMPTS[:1], SamplingParams(n=1, max_tokens=3))
    _assert_samples(first, 1)
    timeouts_before = engine.usage().retries
    assert 1 <= timeouts_before <= 3  # 0.4 s times out; 1.6 s (or 6.4 s...) is enough
    later = engine.sample(PROMPTS[1:4], SamplingParams(n=1, max_tokens=3))
    for result in later:
        _assert_samples(result, 1)
    assert engine.usage().retries == timeouts_before  # >= 4 s per attempt now: no timeouts
    assert engine.usage().failures == {}


@pytest.mark.slow
def test_concurrency_bound_holds_across_overlapping_calls(fresh):
    """One engine, many callers at once (an async Ray Data UDF's batches): max_concurrency
    bounds the requests in flight for the engine, not per call."""
    fresh.set_faults(1.0, ["slow"], slow_seconds=0.3)
    engine = _engine(fresh, max_concurrency=2)

    async def callers():
        calls = [
            engine.asample(PROMPTS[i : i + 2], SamplingParams(n=1, max_tokens=2)) for i in (0, 2, 4)
        ]
        calls.append(engine.ascore(PROMPTS[0], [" red", " blue"]))
        return await asyncio.gather(*calls)

    *sampled, scored = asyncio.run(callers())
    for results in sampled:
        for result in results:
            _assert_samples(result, 1)
    assert not isinstance(scored, EngineError) and len(scored) == 2
    stats = fresh.stats()
    assert stats["requests"] == 7 and stats["max_in_flight"] == 2


@pytest.mark.slow
def test_qps_limit_is_respected(fresh):
    engine = _engine(fresh, qps=4.0, max_concurrency=8)
    start = time.monotonic()
    results = engine.sample(PROMPTS + PROMPTS[:3], SamplingParams(n=1, max_tokens=2))
    elapsed = time.monotonic() - start
    assert all(not isinstance(r, EngineError) for r in results)
    assert fresh.stats()["requests"] == 9
    assert elapsed >= 8 / 4.0 - 0.05  # 9 starts, evenly spaced at 4 per second


@pytest.mark.slow
def test_score_by_echo(fresh):
    engine = _engine(fresh, endpoint="chat")  # scoring always uses completions echo
    scored = engine.score(Prompt(id="s", text="Question: hi\nAnswer:"), [" hello world", ""])
    assert not isinstance(scored, EngineError)
    assert scored[0].num_tokens >= 2 and scored[0].logprob_sum < 0
    assert (scored[1].num_tokens, scored[1].logprob_sum) == (0, 0.0)
    chat_only = engine.score(Prompt(id="m", messages=({"role": "user", "content": "hi"},)), ["x"])
    assert isinstance(chat_only, EngineError)


@pytest.mark.slow
def test_openai_and_hf_engines_score_an_answer_the_same_way(smollm2_path):
    """One definition for every engine: the mean raw log-prob of the answer's own tokens after
    the prompt, EOS excluded. The real SmolLM2 answers until EOS; its answers scored as sampled
    (openai chat), re-read by echo (openai completions) and re-read in-process (hf) agree."""
    from tuna_ray.engines.hf import HFEngine
    from tuna_ray.serve.local import start_local_server

    hf = HFEngine(str(smollm2_path))
    questions = ["Say hello.", "Name one colour.", "What is 2 + 2?"]
    chats = [
        Prompt(id=f"c{i}", messages=({"role": "user", "content": q},))
        for i, q in enumerate(questions)
    ]
    greedy = SamplingParams(n=1, temperature=0.0, max_tokens=64)
    with start_local_server(str(smollm2_path), served_model_name="m") as server:
        base = {"base_url": server.base_url, "model": "m", "timeout_s": 300}
        chat = OpenAIEngine(OpenAIEngineConfig(**base, endpoint="chat"))
        completions = OpenAIEngine(OpenAIEngineConfig(**base, endpoint="completions"))
        samples = [result[0] for result in chat.sample(chats, greedy)]
        as_text = [Prompt(id=p.id, text=hf.render(p)[0]) for p in chats]
        echoed = [completions.score(p, [s.text]) for p, s in zip(as_text, samples)]
    assert all(s.finish_reason == "stop" for s in samples), samples  # they ended at EOS
    for prompt, sample, (echo,) in zip(chats, samples, echoed):
        (direct,) = hf.score(prompt, [sample.text])
        assert sample.num_tokens == echo.num_tokens == direct.num_tokens > 0
        assert sample.logprob_sum == pytest.approx(direct.logprob_sum, abs=1e-3)
        assert echo.logprob_sum == pytest.approx(direct.logprob_sum, abs=1e-3)


@pytest.mark.slow
def test_usable_inside_a_running_event_loop(fresh):
    engine = _engine(fresh)

    async def caller():
        return engine.sample(PROMPTS[:2], SamplingParams(n=1, max_tokens=3))

    for result in asyncio.run(caller()):
        _assert_samples(result, 1)


@pytest.mark.slow
def test_api_key_never_leaks(fresh, tmp_path, monkeypatch, caplog):
    secret = "sk-tuna-secret-" + "7f3a9c1e5b2d"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    caplog.set_level(logging.DEBUG)
    fresh.set_faults(0.5, ["429", "500", "malformed"], seed=3)
    engine = _engine(fresh, cache_dir=str(tmp_path / "cache"), backoff_base_s=0.01)
    results = engine.sample(PROMPTS[:4], SamplingParams(n=1, max_tokens=3))
    wrong_model = _engine(fresh, model="no-such-model").sample(PROMPTS[:1], SamplingParams(n=1))
    assert isinstance(wrong_model[0], EngineError) and "http 404" in wrong_model[0].reason
    texts = [
        caplog.text,
        repr(engine.usage()),
        json.dumps(engine.usage().failures),
        repr(engine.config),
        json.dumps(engine.config.model_dump()),
    ]
    texts += [str(r) + repr(r) for r in results + wrong_model]
    texts += [p.read_bytes().decode("utf-8", "replace") for p in (tmp_path / "cache").iterdir()]
    assert not [t for t in texts if secret in t]
    assert any(not isinstance(r, EngineError) for r in results)  # it did talk to the server
