"""A persistent on-disk cache of validated engine responses, so a rerun never pays twice.

Stage: engines (used by the OpenAI-compatible engine). One SQLite file per cache folder, in
WAL mode with a busy timeout, so several processes (Ray Data actors on one node) can read and
write at once: readers never block, writers queue for a few milliseconds each. SQLite's WAL
needs shared memory, so put ``cache_dir`` on node-local disk or a filesystem with working
locks (not NFS); each node then keeps its own cache.

Keys are the sha256 of the canonical JSON of everything that decides the answer:
``cache_key(base_url=..., model=..., endpoint=..., input=..., params=..., template_version=...)``.
Values are the parsed, validated response (texts, token log-probs, usage) as JSON. Neither the
API key nor any header is ever part of a key or a value: callers pass only request content.

>>> k1 = cache_key(model="m", input=[{"role": "user", "content": "hi"}], params={"n": 2})
>>> k1 == cache_key(params={"n": 2}, input=[{"role": "user", "content": "hi"}], model="m")
True
>>> k1 == cache_key(model="m", input=[{"role": "user", "content": "hi"}], params={"n": 3})
False
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

# Bump when the stored value format changes: old entries then simply stop matching.
CACHE_FORMAT = 1
FILE_NAME = "responses.sqlite3"


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal content gives equal text.

    Tuples become lists, so ``("a",)`` and ``["a"]`` hash alike (both reach the API as arrays).
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def cache_key(**parts: Any) -> str:
    """sha256 hex digest of the canonical JSON of ``parts`` (plus the cache format)."""
    payload = canonical_json({"cache_format": CACHE_FORMAT, **parts})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class ResponseCache:
    """Key → JSON value store in ``<folder>/responses.sqlite3``; safe across processes.

    One connection per process (opened lazily, so the object can be pickled into Ray actors)
    guarded by a lock for the threads of that process.
    """

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / FILE_NAME
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid: int | None = None

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"].parent)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
            _setup(conn)
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def get(self, key: str) -> Any | None:
        with self._lock:
            row = (
                self._connection()
                .execute("SELECT value FROM responses WHERE key = ?", (key,))
                .fetchone()
            )
        return None if row is None else json.loads(row[0])

    def put(self, key: str, value: Any) -> None:
        text = canonical_json(value)
        with self._lock:
            conn = self._connection()
            with conn:  # one short transaction per entry
                conn.execute(
                    "INSERT OR REPLACE INTO responses (key, value, created) VALUES (?, ?, ?)",
                    (key, text, time.time()),
                )

    def __len__(self) -> int:
        with self._lock:
            return self._connection().execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None


def _setup(conn: sqlite3.Connection, attempts: int = 200) -> None:
    """WAL mode and the table. Switching to WAL takes an exclusive lock that SQLite's busy
    timeout does not wait for, so two processes opening a new file at once retry here."""
    for attempt in range(attempts):
        try:
            conn.execute("PRAGMA busy_timeout=60000")
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS responses "
                "(key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL)"
            )
            conn.commit()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.01 + 0.04 * random.random())
