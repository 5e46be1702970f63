"""Pacing for HTTP engines: a QPS limiter, exponential backoff with full jitter, Retry-After.

Stage: engines (pure, no network). Used by the ``openai`` engine; kept apart so the policy can
be read and tested on its own.
"""

from __future__ import annotations

import asyncio
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
