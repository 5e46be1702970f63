"""The ``openai`` engine: any OpenAI-compatible endpoint through the official async client.

Stage: engines. Used by probabilistic ranking (teacher samples + log-probs, re-scoring) and by
the contextual judge (``complete_chat``).

Policy, all visible here rather than inside the client (it runs with ``max_retries=0``):

- one event loop per engine, in a daemon thread, runs every request of every call (sync or
  ``a``-prefixed async, from any thread), so they share one HTTP client (its connection pool),
  one concurrency bound and one rate limiter;
- concurrency: at most ``max_concurrency`` requests in flight per engine (so per Ray actor),
  however many calls overlap;
- rate: at most ``qps`` request *starts* per second per engine, evenly spaced
  (``IntervalLimiter``); retries count against it. Several Ray actors each get their own
  limiter: give each ``qps / actors``;
- timeouts: an attempt waits ``timeout_s``, or 4x the longest the endpoint is known to take
  (its slowest recent answer, or a wait that timed out) when that is longer, up to
  ``max_timeout_s`` (``AdaptiveTimeout``): a slow endpoint slows the stage down instead of
  losing records;
- retries: 408/409/429/5xx, timeouts, connection errors and malformed responses (bad JSON,
  wrong shape, missing or non-finite log-probs) are retried up to ``max_retries`` times after
  ``backoff_delay`` (full jitter, Retry-After as a floor); other 4xx fail at once. A prompt
  that still fails comes back as ``EngineError(reason)``, never as a score, never raised;
- scores: an answer's log-probs are its own tokens' (EOS excluded, openai_parse); ``score``
  re-reads ``prompt.text + response`` through completions ``echo``, all responses of a prompt
  in one request (a list of prompts);
- cache: validated responses only, keyed by everything that decides the answer (cache.py);
- secrets: the key is read from ``os.environ[api_key_env]`` when the engine opens its client
  and lives only in that client, never in what is pickled into Ray actors (the config), the
  cache, ``usage()``, or an error reason (server messages are scrubbed of it).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import threading
import time
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field

from tuna_ray.engines.base import EngineError, Prompt, Sample, SamplingParams, Scored, Usage
from tuna_ray.engines.cache import ResponseCache, cache_key
from tuna_ray.engines.openai_parse import (
    BadResponse,
    parse_chat,
    parse_completions,
    parse_echo_scores,
    parse_usage,
)
from tuna_ray.engines.retry import (
    AdaptiveTimeout,
    IntervalLimiter,
    backoff_delay,
    parse_retry_after,
)

RETRYABLE_STATUS = frozenset({408, 409, 429})
LOOPBACK_DUMMY_KEY = "sk-local-no-key"
TIMEOUT = "timeout"


class MissingAPIKeyError(RuntimeError):
    """The environment variable named by ``api_key_env`` is unset for a remote endpoint."""


class OpenAIEngineConfig(BaseModel):
    """One OpenAI-compatible endpoint and how politely to use it. Holds no secret."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = "https://api.openai.com/v1"
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    # "chat": /chat/completions (messages); "completions": /completions on the rendered prompt
    # text, which also serves ``echo`` re-scoring.
    endpoint: Literal["chat", "completions"] = "chat"
    max_concurrency: int = Field(default=8, ge=1)
    qps: float | None = Field(default=None, gt=0)
    # Each attempt's timeout: timeout_s, or 4x the longest the endpoint is known to take when
    # that is longer, up to max_timeout_s (None or <= timeout_s: always timeout_s).
    timeout_s: float = Field(default=60.0, gt=0)
    max_timeout_s: float | None = Field(default=600.0, gt=0)
    max_retries: int = Field(default=6, ge=0)
    backoff_base_s: float = Field(default=0.5, ge=0)
    backoff_max_s: float = Field(default=30.0, ge=0)
    cache_dir: str | None = None
    # What the cache keys the endpoint by, when not base_url: an embedded server is known by
    # its name ("embedded:teacher"), not by the port it got this time (set by the pipeline).
    cache_base_url: str | None = None
    price_per_1m_input: float = Field(default=0.0, ge=0)
    price_per_1m_output: float = Field(default=0.0, ge=0)
    template_version: str = "v1"
    extra_body: dict[str, Any] | None = None


def is_loopback(base_url: str) -> bool:
    host = urlparse(base_url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_api_key(config: OpenAIEngineConfig) -> str:
    """The key from ``$api_key_env``; a dummy for loopback servers; else a clear error."""
    key = os.environ.get(config.api_key_env)
    if key:
        return key
    if is_loopback(config.base_url):
        return LOOPBACK_DUMMY_KEY
    raise MissingAPIKeyError(
        f"environment variable {config.api_key_env} is not set; it must hold the API key for "
        f"{config.base_url} (keys never go in config files)"
    )


class _Failure:
    def __init__(self, reason: str, retryable: bool, retry_after: float | None = None):
        self.reason, self.retryable, self.retry_after = reason, retryable, retry_after


def classify_error(exc: Exception, *, secret: str | None = None) -> _Failure:
    """Map an exception from one attempt to a reason and whether to retry it."""
    import openai

    if isinstance(exc, BadResponse):
        return _Failure(exc.reason, True)
    if isinstance(exc, openai.APITimeoutError):
        return _Failure(TIMEOUT, True)
    if isinstance(exc, openai.APIConnectionError):
        return _Failure("connection error", True)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        if status in RETRYABLE_STATUS or status >= 500:
            return _Failure(f"http {status}", True, parse_retry_after(exc.response.headers))
        detail = str(exc.message)[:300]
        if secret:
            detail = detail.replace(secret, "***")
        return _Failure(f"http {status}: {detail}", False)
    raise exc


class _Runtime:
    """The engine's event loop (in a daemon thread), its HTTP client and concurrency gate."""

    def __init__(self, config: OpenAIEngineConfig):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name=f"openai-engine:{config.model}", daemon=True
        )
        self.thread.start()
        self.client, self.gate = self.submit(self._open(config)).result()

    @staticmethod
    async def _open(config: OpenAIEngineConfig):
        import openai

        client = openai.AsyncOpenAI(
            api_key=resolve_api_key(config),
            base_url=config.base_url,
            timeout=config.timeout_s,
            max_retries=0,  # our policy, in OpenAIEngine._request, is the only one
        )
        return client, asyncio.Semaphore(config.max_concurrency)

    def submit(self, coro: Coroutine):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        if threading.current_thread() is self.thread:  # collected on its own loop: just stop
            self.loop.call_soon(self.loop.stop)
            return
        with contextlib.suppress(Exception):  # best effort, e.g. at interpreter shutdown
            self.submit(self.client.close()).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


class OpenAIEngine:
    """``Engine`` over an OpenAI-compatible HTTP API (see the module docstring for policy)."""

    def __init__(self, config: OpenAIEngineConfig):
        resolve_api_key(config)  # fail now, with the variable's name, not on the first call
        self.config = config
        self.name = f"openai:{config.model}@{config.base_url}"
        self._cache = ResponseCache(config.cache_dir) if config.cache_dir else None
        self._limiter = IntervalLimiter(config.qps)
        self._timeouts = AdaptiveTimeout(config.timeout_s, config.max_timeout_s)
        self._usage = Usage()
        self._lock = threading.Lock()
        self._runtime: _Runtime | None = None

    def __getstate__(self) -> dict:
        return {"config": self.config}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["config"])

    def close(self) -> None:
        """Close the HTTP client and stop the engine's loop (also done when it is collected)."""
        with self._lock:
            runtime, self._runtime = self._runtime, None
        if runtime is not None:
            runtime.close()

    # ---- Engine interface: blocking calls ---------------------------------------------------

    def sample(
        self, prompts: list[Prompt], params: SamplingParams
    ) -> list[list[Sample] | EngineError]:
        return self._blocking(self._sample(prompts, params))

    def score(self, prompt: Prompt, responses: list[str]) -> list[Scored] | EngineError:
        """Log-likelihood of each response after ``prompt.text`` via completions ``echo``."""
        return self._blocking(self._score(prompt, responses))

    def complete_chat(
        self,
        prompts: list[Prompt],
        params: SamplingParams,
        *,
        require_logprobs: bool = False,
        response_format: dict | None = None,
    ) -> list[list[str] | EngineError]:
        """Plain chat texts (judges): ``params.n`` per prompt, cached, same retry policy."""
        return self._blocking(
            self._complete_chat(prompts, params, require_logprobs, response_format)
        )

    # ---- the same, awaitable from any event loop (Ray Data async UDFs) ----------------------

    async def asample(
        self, prompts: list[Prompt], params: SamplingParams
    ) -> list[list[Sample] | EngineError]:
        return await self._awaitable(self._sample(prompts, params))

    async def ascore(self, prompt: Prompt, responses: list[str]) -> list[Scored] | EngineError:
        return await self._awaitable(self._score(prompt, responses))

    async def acomplete_chat(
        self,
        prompts: list[Prompt],
        params: SamplingParams,
        *,
        require_logprobs: bool = False,
        response_format: dict | None = None,
    ) -> list[list[str] | EngineError]:
        return await self._awaitable(
            self._complete_chat(prompts, params, require_logprobs, response_format)
        )

    def usage(self) -> Usage:
        """Totals since construction: ``requests`` = HTTP attempts sent (retries included),
        ``cached`` = answers served from the cache, tokens as the server reported them (also
        for responses we rejected: they were billed), cost from the config's price table."""
        with self._lock:
            u = self._usage
            cost = (
                u.prompt_tokens * self.config.price_per_1m_input
                + u.completion_tokens * self.config.price_per_1m_output
            ) / 1e6
            return Usage(
                requests=u.requests,
                cached=u.cached,
                prompt_tokens=u.prompt_tokens,
                completion_tokens=u.completion_tokens,
                cost_usd=cost,
                retries=u.retries,
                failures=dict(u.failures),
            )

    # ---- the calls, as coroutines on the engine's loop --------------------------------------

    async def _sample(self, prompts, params):
        chat = self.config.endpoint == "chat"
        jobs = [self._sample_job(p, params, chat=chat, require_logprobs=True) for p in prompts]
        return [_to_samples(r) for r in await self._run_all(jobs)]

    async def _score(self, prompt: Prompt, responses: list[str]):
        if prompt.text is None:
            return EngineError("score needs Prompt.text (completions echo)", prompt_id=prompt.id)
        if not responses:
            return []
        (result,) = await self._run_all([self._score_job(prompt, responses)])
        if isinstance(result, EngineError):
            return result
        return [Scored(logprob_sum=r["logprob_sum"], num_tokens=r["num_tokens"]) for r in result]

    async def _complete_chat(self, prompts, params, require_logprobs, response_format):
        jobs = [
            self._sample_job(
                p, params, chat=True, require_logprobs=require_logprobs, fmt=response_format
            )
            for p in prompts
        ]
        results = await self._run_all(jobs)
        return [r if isinstance(r, EngineError) else [s["text"] for s in r] for r in results]

    # ---- request building -------------------------------------------------------------------

    def _sample_job(self, prompt, params, *, chat, require_logprobs, fmt=None):
        body: dict[str, Any] = {
            "n": params.n,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if chat:
            messages = [dict(m) for m in prompt.messages or ()] or [
                {"role": "user", "content": prompt.text or ""}
            ]
            body["messages"] = messages
            if require_logprobs:
                body["logprobs"] = True
            if fmt is not None:
                body["response_format"] = fmt
        else:
            if prompt.text is None:
                return EngineError("completions endpoint needs Prompt.text", prompt_id=prompt.id)
            body["prompt"] = prompt.text
            body["logprobs"] = 1

        def parse(raw: dict) -> list[dict]:
            if chat:
                return parse_chat(raw, params.n, require_logprobs=require_logprobs)
            return parse_completions(raw, params.n)

        kind = "chat" if chat else "completions"
        return prompt.id, kind, body, parse

    def _score_job(self, prompt: Prompt, responses: list[str]):
        """One echo request for all responses: ``prompt`` is the list ``[text + response_k]``."""
        texts = [prompt.text + r for r in responses]
        body = {"prompt": texts, "echo": True, "max_tokens": 0, "logprobs": 1, "temperature": 0.0}
        boundary, ends = len(prompt.text), [len(t) for t in texts]
        return (
            prompt.id,
            "completions",
            body,
            lambda raw: parse_echo_scores(raw, boundary, ends),
        )

    # ---- running ----------------------------------------------------------------------------

    def _loop(self) -> _Runtime:
        with self._lock:
            if self._runtime is None:
                self._runtime = _Runtime(self.config)
                weakref.finalize(self, self._runtime.close)
            return self._runtime

    def _blocking(self, coro: Coroutine) -> Any:
        """Run ``coro`` on the engine's loop and wait for it (from any thread, any loop)."""
        return self._loop().submit(coro).result()

    async def _awaitable(self, coro: Coroutine) -> Any:
        """Run ``coro`` on the engine's loop; the caller's loop stays free meanwhile."""
        return await asyncio.wrap_future(self._loop().submit(coro))

    async def _run_all(self, jobs: list) -> list[Any]:
        runtime = self._runtime

        async def run(job: Any) -> Any:
            if isinstance(job, EngineError):  # refused before sending anything
                self._count(failure=job.reason)
                return job
            return await self._request(runtime.client, runtime.gate, *job)

        return await asyncio.gather(*(run(job) for job in jobs))

    async def _request(self, client, gate, prompt_id, kind, body, parse) -> Any:
        import openai

        cfg = self.config
        key = None
        if self._cache is not None:
            key = cache_key(
                base_url=(cfg.cache_base_url or cfg.base_url).rstrip("/"),
                model=cfg.model,
                endpoint=kind,
                request={**body, **(cfg.extra_body or {})},
                template_version=cfg.template_version,
            )
            hit = await asyncio.to_thread(self._cache.get, key)
            if hit is not None:
                self._count(cached=1)
                return hit
        create = client.chat.completions if kind == "chat" else client.completions
        failure = None
        for attempt in range(cfg.max_retries + 1):
            if attempt:
                self._count(retries=1)
                await asyncio.sleep(
                    backoff_delay(
                        attempt - 1,
                        cfg.backoff_base_s,
                        cfg.backoff_max_s,
                        retry_after=failure.retry_after,
                    )
                )
            async with gate:
                await self._limiter.acquire()
                self._count(requests=1)
                timeout = self._timeouts.timeout()
                try:
                    sent = time.monotonic()
                    raw = await create.with_raw_response.create(
                        model=cfg.model, extra_body=cfg.extra_body, timeout=timeout, **body
                    )
                    text = raw.http_response.text
                    self._timeouts.observe(time.monotonic() - sent)
                    value = self._parse_counted(text, parse)
                except (openai.APIError, BadResponse) as exc:
                    failure = classify_error(exc, secret=os.environ.get(cfg.api_key_env))
                    if failure.reason == TIMEOUT:
                        self._timeouts.timed_out(timeout)
                    if not failure.retryable:
                        break
                    continue
            if key is not None:
                await asyncio.to_thread(self._cache.put, key, value)
            return value
        self._count(failure=failure.reason.split(":")[0])
        return EngineError(failure.reason, prompt_id=prompt_id, retryable=failure.retryable)

    def _parse_counted(self, text: str, parse: Callable[[dict], Any]) -> Any:
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise BadResponse("malformed response") from exc
        if not isinstance(raw, dict):
            raise BadResponse("malformed response")
        # A response we reject was still billed: count its tokens before validating.
        prompt_tokens, completion_tokens = parse_usage(raw)
        self._count(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        return parse(raw)

    def _count(self, *, failure: str | None = None, **fields: int) -> None:
        with self._lock:
            for name, value in fields.items():
                setattr(self._usage, name, getattr(self._usage, name) + value)
            if failure is not None:
                self._usage.failures[failure] = self._usage.failures.get(failure, 0) + 1


def _to_samples(result: Any) -> list[Sample] | EngineError:
    if isinstance(result, EngineError):
        return result
    return [Sample(s["text"], s["token_logprobs"], s.get("finish_reason")) for s in result]
