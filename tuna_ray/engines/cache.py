"""The engine response cache: validated responses kept with the run, so a rerun never pays twice.

Stage: engines (used by the OpenAI-compatible engine). Two layers:

- **durable** -- ``cache_dir``, a local path or any pyarrow URI; the pipeline puts it in the
  run storage (``run_dir/<stage>/cache/``), so it survives node loss, autoscaling and job
  retries. It holds JSON-lines *cache parts* (``part-<uuid>.jsonl``, one ``{"key", "value"}``
  per line) and ``cache-id.txt`` (a random id, new whenever the folder is recreated). Each
  process writes the entries it added since its last flush as one new part: at every stage
  part boundary (``flush_all``, called before a batch's output part is written, so results on
  disk always have their responses cached), after ``FLUSH_EVERY`` new entries, and at exit.
  ``compact`` merges the parts of a finished stage into one.
- **local** -- one SQLite file per (cache_dir, cache id) under ``storage.node_cache_dir()``, in
  WAL mode with a busy timeout, so the processes of one node (Ray Data actors) read and write
  it at once. A process imports the durable parts it has not seen yet on first use. SQLite
  cannot live on object storage or NFS, hence the node-local disk; a node that is lost loses
  only this copy.

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

import atexit
import hashlib
import json
import logging
import os
import random
import sqlite3
import threading
import time
import uuid
import weakref
from typing import Any

from tuna_ray import storage

log = logging.getLogger(__name__)

# Bump when the stored value format changes: old entries then simply stop matching.
CACHE_FORMAT = 1
FILE_NAME = "responses.sqlite3"
ID_FILE = "cache-id.txt"
FLUSH_EVERY = 256  # new entries a process keeps before it writes a cache part by itself


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal content gives equal text.

    Tuples become lists, so ``("a",)`` and ``["a"]`` hash alike (both reach the API as arrays).
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def cache_key(**parts: Any) -> str:
    """sha256 hex digest of the canonical JSON of ``parts`` (plus the cache format)."""
    payload = canonical_json({"cache_format": CACHE_FORMAT, **parts})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


_LIVE: weakref.WeakSet = weakref.WeakSet()  # this process's caches, for flush_all


def flush_all() -> None:
    """Write every cache of this process's new entries to its durable folder (a part each)."""
    for cache in list(_LIVE):
        cache.flush()


def _flush_at_exit() -> None:
    try:
        flush_all()
    except Exception:  # exiting anyway; the entries stay in the local layer
        log.exception("could not write the response cache at exit")


atexit.register(_flush_at_exit)


class ResponseCache:
    """Key -> JSON value store kept in ``folder`` (local path or URI); see the module docstring.

    One SQLite connection per process (opened lazily, so the object can be pickled into Ray
    actors) guarded by a lock for the threads of that process.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = str(folder)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid: int | None = None
        self._pending: list[tuple[str, str]] = []
        self.local_path = None  # the node-local SQLite file, known after first use
        _LIVE.add(self)

    def __getstate__(self) -> dict:
        return {"folder": self.folder}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["folder"])

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            if self._pid != os.getpid():
                self._pending = []  # a forked child does not own its parent's entries
            key = hashlib.sha256(f"{_identity(self.folder)}\0{self._cache_id()}".encode())
            self.local_path = storage.node_cache_dir() / "response-cache" / key.hexdigest()[:20]
            self.local_path.mkdir(parents=True, exist_ok=True)
            (self.local_path / "source.txt").write_text(self.folder + "\n")
            conn = sqlite3.connect(self.local_path / FILE_NAME, timeout=60, check_same_thread=False)
            _setup(conn)
            self._conn, self._pid = conn, os.getpid()
            self._import_parts(conn)
        return self._conn

    def _cache_id(self) -> str:
        """The durable folder's id (created on first use): a recreated folder gets a new one,
        so a node never serves entries that were deleted from the run storage."""
        path = storage.join(self.folder, ID_FILE)
        try:
            return storage.read_text(path).strip()
        except FileNotFoundError:
            storage.write_text(path, uuid.uuid4().hex + "\n")
            return storage.read_text(path).strip()

    def _import_parts(self, conn: sqlite3.Connection) -> None:
        seen = {row[0] for row in conn.execute("SELECT name FROM imported")}
        for part in storage.list_files(self.folder):
            name = part.rsplit("/", 1)[-1]
            if not name.endswith(".jsonl") or name in seen:
                continue
            try:
                rows = _read_part(part)
            except FileNotFoundError:  # merged away by a compaction meanwhile
                continue
            with conn:
                conn.executemany(
                    "INSERT OR IGNORE INTO responses (key, value, created) VALUES (?, ?, ?)",
                    [(k, v, time.time()) for k, v in rows],
                )
                conn.execute("INSERT OR IGNORE INTO imported (name) VALUES (?)", (name,))

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
            self._pending.append((key, text))
            full = len(self._pending) >= FLUSH_EVERY
        if full:
            self.flush()

    def flush(self) -> None:
        """Write the entries this process added since the last flush as one durable part."""
        with self._lock:
            if self._pid != os.getpid() or not self._pending:
                return
            pending, self._pending = self._pending, []
            name = f"part-{uuid.uuid4().hex}.jsonl"
            try:
                storage.write_text(
                    storage.join(self.folder, name),
                    "".join(canonical_json({"key": k, "value": v}) + "\n" for k, v in pending),
                )
            except BaseException:
                self._pending = pending + self._pending
                raise
            with self._conn:
                self._conn.execute("INSERT OR IGNORE INTO imported (name) VALUES (?)", (name,))

    def __len__(self) -> int:
        with self._lock:
            return self._connection().execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        self.flush()
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None


def _identity(folder: str) -> str:
    fs, path = storage.filesystem(folder)
    return f"{fs.type_name}:{path.rstrip('/')}"


def _read_part(part: str) -> list[tuple[str, str]]:
    rows = []
    for line in storage.read_text(part).splitlines():
        if line.strip():
            entry = json.loads(line)
            rows.append((entry["key"], entry["value"]))
    return rows


def compact(folder: str) -> int:
    """Merge the cache parts in ``folder`` into one (fewer files to read at the next start);
    returns how many parts were merged. Run it while no process writes there (a finished
    stage under its lease). The merged part is written before the small ones are deleted, so
    a crash in between leaves duplicates, never a loss."""
    names = [p for p in storage.list_files(folder) if p.endswith(".jsonl")]
    if len(names) < 2:
        return 0
    merged: dict[str, str] = {}
    for part in names:
        for key, value in _read_part(part):
            merged.setdefault(key, value)
    storage.write_text(
        storage.join(folder, f"part-{uuid.uuid4().hex}.jsonl"),
        "".join(canonical_json({"key": k, "value": v}) + "\n" for k, v in merged.items()),
    )
    for part in names:
        storage.delete_file(part)
    return len(names)


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
            conn.execute("CREATE TABLE IF NOT EXISTS imported (name TEXT PRIMARY KEY)")
            conn.commit()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.01 + 0.04 * random.random())
