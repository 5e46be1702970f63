"""Switchable, seeded fault injection for the local server (tests of the openai engine).

Stage: serve. For each inference request (POST /v1/completions, /v1/chat/completions) the
injector draws from its own ``random.Random(seed)``: one draw decides whether to inject (with
probability ``rate``), a second which kind. The sequence of faults is therefore fixed by the
seed and the order of requests; ``POST /admin/reset`` and ``POST /admin/faults`` re-seed it.

What a client (the official ``openai`` package) sees for each kind:

=============  ==============================================================================
``429``        HTTP 429, ``Retry-After: 1``, OpenAI error JSON -> ``openai.RateLimitError``
``500``        HTTP 500, OpenAI error JSON -> ``openai.InternalServerError``
``slow``       the normal answer after ``slow_seconds`` -> ``openai.APITimeoutError`` when the
               client's timeout is shorter
``drop``       status line and headers, then the connection closes before the body ->
               ``openai.APIConnectionError``
``malformed``  HTTP 200, ``application/json``, a truncated JSON body -> a JSON decode error
               (``json.JSONDecodeError``) while parsing
``no_logprobs`` a valid answer whose choices have ``logprobs: null``
=============  ==============================================================================
"""

from __future__ import annotations

import json
import random
import threading
from collections import Counter

from pydantic import BaseModel, ConfigDict, Field, field_validator

FAULT_KINDS = ("429", "500", "slow", "drop", "malformed", "no_logprobs")
# Faults answered before the request reaches the model.
EARLY_FAULTS = ("429", "500", "drop", "malformed")


class FaultConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rate: float = Field(default=0.0, ge=0.0, le=1.0)
    kinds: tuple[str, ...] = FAULT_KINDS
    seed: int = 0
    slow_seconds: float = Field(default=5.0, ge=0.0)
    retry_after: int = Field(default=1, ge=0)

    @field_validator("kinds", mode="before")
    @classmethod
    def _split(cls, value):
        if isinstance(value, str):
            value = [k.strip() for k in value.split(",") if k.strip()]
        unknown = sorted(set(value) - set(FAULT_KINDS))
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}; known: {list(FAULT_KINDS)}")
        return tuple(value)


class FaultInjector:
    """Decides, per request and reproducibly, whether and how to fail; counts what it did."""

    def __init__(self, config: FaultConfig | None = None):
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.configure(config or FaultConfig())

    def configure(self, config: FaultConfig) -> None:
        with self._lock:
            self.config = config
            self._rng = random.Random(config.seed)

    def reset(self) -> None:
        """Re-seed (the same fault sequence starts again) and zero the counts."""
        self.configure(self.config)
        with self._lock:
            self.counts.clear()

    def draw(self) -> str | None:
        with self._lock:
            if not self.config.kinds or self.config.rate <= 0.0:
                return None
            if self._rng.random() >= self.config.rate:
                return None
            kind = self._rng.choice(self.config.kinds)
            self.counts[kind] += 1
            return kind


async def send_early_fault(kind: str, config: FaultConfig, send) -> None:
    """Answer (or fail to answer) an ASGI request with one of ``EARLY_FAULTS``."""
    if kind in ("429", "500"):
        status = int(kind)
        error = {
            "message": f"injected fault: {kind}",
            "type": "rate_limit_error" if status == 429 else "server_error",
            "param": None,
            "code": "rate_limit_exceeded" if status == 429 else None,
        }
        body = json.dumps({"error": error}).encode()
        headers = [(b"content-type", b"application/json")]
        if status == 429:
            headers.append((b"retry-after", str(config.retry_after).encode()))
        await _send(send, status, headers, body)
    elif kind == "malformed":
        body = b'{"id": "cmpl-malformed", "object": "text_completion", "choices": [{"text": "'
        await _send(send, 200, [(b"content-type", b"application/json")], body)
    elif kind == "drop":
        # Promise a body, then return without sending it: uvicorn closes the connection
        # ("ASGI callable returned without completing response"), the client sees it drop.
        headers = [(b"content-type", b"application/json"), (b"content-length", b"4096")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
    else:
        raise ValueError(f"{kind!r} is not an early fault")


async def _send(send, status: int, headers: list, body: bytes) -> None:
    headers = headers + [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
