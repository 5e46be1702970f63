"""Progress lines a person can read, in a terminal and in ``ray job logs`` alike.

One line when something changed (records done, rate, ETA), never a repeat of an unchanged
status; during a long silence one line a minute saying what the stage is waiting for.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Self

log = logging.getLogger(__name__)


def duration(seconds: float) -> str:
    """``75`` -> ``"1 min 15 s"``; ``9.6`` -> ``"10 s"``."""
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class RecordProgress:
    """Records done of a stage's ``total`` (``before`` of them done by an earlier run).

    ``add(n)`` when results come back (the driver sees whole batches: ``scaling.batch_size``
    records, several batches in flight per actor for API engines). Until the first result a
    heartbeat says what the stage is waiting for (engine start: model load, DeepSpeed or vLLM
    set-up), then that it is still working, once per ``heartbeat_s``.
    """

    def __init__(self, name: str, total: int, before: int = 0, *, heartbeat_s: float = 60.0):
        self.name, self.total, self.done, self.before = name, total, before, before
        self.t0 = time.perf_counter()
        self._last_change = self.t0
        self._stop = threading.Event()
        self._heartbeat_s = heartbeat_s
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"{name}-progress")

    def __enter__(self) -> Self:
        log.info(
            "%s: %d of %d records to do; the first results come once the engines have started",
            self.name,
            self.total - self.before,
            self.total,
        )
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        new = self.done - self.before
        rate = new / elapsed if elapsed > 0 else 0.0
        text = (
            f"{self.name}: {self.done}/{self.total} records ({100 * self.done / self.total:.0f}%)"
        )
        if new and rate > 0:
            text += f" | {rate:.2f} records/s, ETA {duration((self.total - self.done) / rate)}"
        return text

    def add(self, n: int) -> None:
        if n <= 0:
            return
        self.done += n
        self._last_change = time.perf_counter()
        log.info("%s", self.line())

    def _beat(self) -> None:
        while not self._stop.wait(self._heartbeat_s):
            silent = time.perf_counter() - self._last_change
            if silent < self._heartbeat_s:
                continue
            waiting = (
                "the engines are starting (model load) or working on the first batches"
                if self.done == self.before
                else "working on the next batches"
            )
            log.info("%s: still running, %s (%s)", self.line(), waiting, duration(silent))
