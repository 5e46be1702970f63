"""Pacing for HTTP engines: a QPS limiter, exponential backoff with full jitter, Retry-After,
and per-attempt timeouts that adapt to the endpoint's observed latency.

Stage: engines (pure, no network). Used by the ``openai`` engine; kept apart so the policy can
be read and tested on its own.
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import math
import random
import threading
import time
from collections.abc import Callable, Mapping

RETRY_AFTER_CAP_S = 600.0  # a server asking for more is not worth waiting for in-line


def parse_retry_after(headers: Mapping[str, str] | None, *, now: float | None = None):
    """Seconds to wait from ``retry-after-ms``, ``retry-after`` (seconds or HTTP date); or None.

    >>> parse_retry_after({"retry-after": "2.5"}), parse_retry_after({"retry-after-ms": "150"})
    (2.5, 0.15)
    """
    if not headers:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    value = headers.get("retry-after")
    date = email.utils.parsedate_tz(value) if value else None
    if date is None:
        return None
    return max(0.0, email.utils.mktime_tz(date) - (time.time() if now is None else now))


def backoff_delay(
    attempt: int,
    base_s: float,
    max_s: float,
    *,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Seconds to sleep before retry number ``attempt`` (0-based): "full jitter".

    Uniform in ``[0, min(max_s, base_s * 2**attempt)]``, so many clients that failed together
    spread out. A server's Retry-After is a floor (capped at RETRY_AFTER_CAP_S).
    """
    ceiling = min(max_s, base_s * 2.0 ** min(attempt, 62))
    delay = (rng or random).uniform(0.0, ceiling)
    if retry_after is not None:
        delay = max(delay, min(retry_after, RETRY_AFTER_CAP_S))
    return delay


class IntervalLimiter:
    """At most ``qps`` acquisitions per second, evenly spaced (a token bucket of one token).

    Each ``reserve`` claims the next free start slot, so over any window of T seconds at most
    ``T * qps + 1`` requests start. Thread-safe and loop-agnostic (only a clock and a lock), so
    one limiter serves every call of an engine even though each call has its own event loop.
    """

    def __init__(self, qps: float | None, *, clock: Callable[[], float] = time.monotonic):
        self.interval = 0.0 if qps is None else 1.0 / qps
        self._clock = clock
        self._next = -math.inf
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Claim the next slot; return the seconds until it."""
        if not self.interval:
            return 0.0
        with self._lock:
            now = self._clock()
            slot = max(now, self._next)
            self._next = slot + self.interval
        return slot - now

    async def acquire(self) -> None:
        delay = self.reserve()
        if delay > 0:
            await asyncio.sleep(delay)


class AdaptiveTimeout:
    """Per-attempt timeouts that follow how slow the endpoint has proven to be.

    A fixed timeout turns a slow endpoint into lost records: a busy self-hosted server queues
    requests, the client gives up on the ones at the back, the server still works on them, the
    retries queue behind them, and after ``max_retries`` the records fail. So every attempt
    waits ``factor`` times the longest the endpoint is known to take -- the slowest of the
    last ``window`` answers, or an attempt that timed out (it would have taken longer) --
    at least ``base_s`` and at most ``max_s``:

        min(max_s, max(base_s, factor * slowest recent answer, factor * longest timed-out wait))

    So the configured timeout holds while the endpoint answers within ``base_s / factor``; a
    round of timeouts makes every later attempt (the retries among them) ``factor`` times more
    patient; nothing waits beyond ``max_s`` (``max_s`` None or <= ``base_s``: a fixed
    timeout). Thread-safe; one per engine.

    >>> t = AdaptiveTimeout(10.0, 300.0)
    >>> t.timeout()
    10.0
    >>> t.observe(6.0); t.timeout()
    24.0
    >>> t.timed_out(24.0); t.timeout()
    96.0
    >>> t.timed_out(96.0); t.timeout()
    300.0
    """

    def __init__(
        self, base_s: float, max_s: float | None = None, *, factor: float = 4.0, window: int = 64
    ):
        self.base_s = base_s
        self.max_s = base_s if max_s is None else max(base_s, max_s)
        self.factor = factor
        self._recent: collections.deque[float] = collections.deque(maxlen=window)
        self._waited = 0.0  # the longest wait that timed out
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        """Record how long an answered attempt took (sending to the last byte)."""
        with self._lock:
            self._recent.append(seconds)

    def timed_out(self, seconds: float) -> None:
        """Record an attempt that gave up after ``seconds`` without an answer."""
        with self._lock:
            self._waited = max(self._waited, seconds)

    def timeout(self) -> float:
        """Seconds the next attempt may take."""
        with self._lock:
            known = max(self._waited, max(self._recent, default=0.0))
        return min(self.max_s, max(self.base_s, self.factor * known))
