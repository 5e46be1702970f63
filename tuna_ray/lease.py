"""One writer per output directory: a lease file with its owner, a heartbeat and an expiry.

Stage: storage (used by the generation stages' driver and by training). Two runs writing the
same stage output would pay every request twice, or -- with different configs -- delete each
other's results and leave a file mixing both under one config hash. So a run takes the lease
of its output directory before it touches anything there:

    with hold_lease(output_dir, what="rank_probabilistic"):
        ...  # the only writer of output_dir

The lease is ``<dir>/_lease.json``: ``token`` (random), ``host``, ``pid`` (with its pid
namespace), the process start time, ``started``, ``heartbeat`` (rewritten every ``heartbeat_s`` by a daemon thread) and
``ttl_s``. A second run finds a live lease and stops with ``LeaseHeldError`` naming the
holder. A lease is stale, and is taken over, when its heartbeat is older than ``ttl_s`` or when
its holder ran on this host and that process is gone (pid dead, or reused by a process that
started later).

The guarantee, honestly: pyarrow filesystems have no compare-and-swap (S3 conditional writes
are not exposed), so acquiring is *write, wait ``settle_s``, read back*: the writer whose token
is read back holds the lease; the others see a live lease and stop. Object stores and local
disks read back the last completed write (S3 is strongly consistent), so two contenders both
win only if one of them takes longer than ``settle_s`` between reading "free" and writing its
token (a stalled process). Such a loser finds out at its next heartbeat (the file holds another
token) and ``check_held`` -- called before a stage commits its results -- raises
``LeaseLostError`` so it never writes a manifest. Expiry compares the holder's clock (its
heartbeat) with the reader's: node clocks must agree to well within ``ttl_s`` (NTP does).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from tuna_ray import storage

log = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"
TTL_S = 90.0  # a holder that stopped heartbeating this long ago is gone
HEARTBEAT_S = 15.0
# Wait between writing a claim and reading it back: longer than a contender may take between
# reading "free" and writing its own claim (object stores: a request each way).
SETTLE_S = {"uri": 1.0, "local": 0.2}


class LeaseHeldError(RuntimeError):
    """Another live run holds the output directory; the message names it."""


class LeaseLostError(RuntimeError):
    """This run's lease was taken over by another run while it worked: do not commit."""


def _process_started(pid: int) -> float | None:
    try:
        import psutil
    except ImportError:  # unknown: the pid check alone decides
        return None
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _host() -> str:
    return socket.gethostname()


def _pid_namespace() -> str:
    """Which pid numbering this process sees (containers on one host share a hostname)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _gone(holder: dict) -> bool:
    """The holder ran on this host, in this pid namespace, and its process is no longer there."""
    if holder.get("host") != _host() or holder.get("pid_namespace", "") != _pid_namespace():
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        pass
    started, recorded = _process_started(pid), holder.get("process_started")
    # A pid reused by a process that started after the holder did is not the holder.
    return started is not None and recorded is not None and started > recorded + 1.0


def stale_reason(holder: dict, now: float | None = None) -> str | None:
    """Why ``holder``'s lease no longer counts, or None while it is live."""
    now = time.time() if now is None else now
    age = now - float(holder.get("heartbeat", 0))
    if age > float(holder.get("ttl_s", TTL_S)):
        return f"no heartbeat for {age:.0f} s (expiry {holder.get('ttl_s', TTL_S):g} s)"
    if _gone(holder):
        return f"process {holder.get('pid')} on {holder.get('host')} is gone"
    return None


def describe(holder: dict, now: float | None = None) -> str:
    now = time.time() if now is None else now
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
    text = (
        f"host {holder.get('host')} pid {holder.get('pid')} (started {started}, last "
        f"heartbeat {now - float(holder.get('heartbeat', 0)):.0f} s ago"
    )
    if holder.get("what"):
        text += f", {holder['what']}"
    if holder.get("command"):
        text += f", command: {holder['command']}"
    return text + ")"


def _command() -> str:
    """This process's command line, short: ``tuna_ray run --config ...`` for ``python -m``."""
    argv = list(sys.argv) or ["python"]
    head, name = os.path.split(argv[0])
    argv[0] = os.path.basename(head) if name == "__main__.py" else name
    return " ".join(argv)[:300]


def read_holder(directory: str) -> dict | None:
    """The lease record in ``directory``, or None (no lease, or an unreadable one)."""
    path = storage.join(directory, LEASE_FILE)
    try:
        holder = json.loads(storage.read_text(path))
    except FileNotFoundError:
        return None
    except ValueError:
        log.warning("%s: unreadable lease file, treating it as stale", path)
        return None
    return holder if isinstance(holder, dict) and "token" in holder else None


@dataclass
class Lease:
    """A held lease; ``release()`` (or leaving ``hold_lease``) gives it back."""

    directory: str
    record: dict
    heartbeat_s: float
    lost: str | None = None  # why this run no longer holds it
    _depth: int = 1
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def path(self) -> str:
        return storage.join(self.directory, LEASE_FILE)

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(
            target=self._beat, name=f"lease-heartbeat {self.directory}", daemon=True
        )
        self._thread.start()

    def _beat(self) -> None:
        last_ok = time.time()
        while not self._stop.wait(self.heartbeat_s):
            try:
                current = read_holder(self.directory)
                if current is not None and current["token"] != self.record["token"]:
                    self.lost = f"taken over by {describe(current)}"
                    log.error("%s: lease lost, %s", self.directory, self.lost)
                    return
                if current is None:  # deleted under us (a restart clearing the folder)
                    log.warning("%s: lease file gone, writing it again", self.directory)
                self.record["heartbeat"] = time.time()
                storage.write_text(self.path, json.dumps(self.record))
                last_ok = time.time()
            except (
                OSError,
                ValueError,
            ) as exc:  # a flaky store: try again next beat, up to the expiry
                log.warning("%s: lease heartbeat failed: %s", self.directory, exc)
                if time.time() - last_ok > float(self.record["ttl_s"]):
                    self.lost = f"no heartbeat written for {time.time() - last_ok:.0f} s"
                    log.error("%s: lease lost, %s", self.directory, self.lost)
                    return

    def check(self) -> None:
        """Raise ``LeaseLostError`` unless the lease file still holds this run's token."""
        if self.lost is None:
            current = read_holder(self.directory)
            if current is not None and current["token"] != self.record["token"]:
                self.lost = f"taken over by {describe(current)}"
        if self.lost is not None:
            raise LeaseLostError(
                f"{self.directory}: another run took this output over ({self.lost}); "
                "stopping without committing results"
            )

    def release(self) -> None:
        self._depth -= 1
        if self._depth > 0:
            return
        _HELD.pop(_key(self.directory), None)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 30)
        try:
            current = read_holder(self.directory)
            if current is not None and current["token"] == self.record["token"]:
                storage.delete_file(self.path)
        except OSError as exc:  # the lease expires by itself
            log.warning("%s: could not remove the lease file: %s", self.directory, exc)


_HELD: dict[str, Lease] = {}
_HELD_LOCK = threading.Lock()


def _key(directory: str) -> str:
    fs, path = storage.filesystem(directory)
    return f"{fs.type_name}:{path.rstrip('/')}"


def acquire_lease(
    directory: str,
    *,
    what: str = "",
    ttl_s: float = TTL_S,
    heartbeat_s: float = HEARTBEAT_S,
    settle_s: float | None = None,
) -> Lease:
    """Take the lease of ``directory`` (created if needed), or raise ``LeaseHeldError``.

    Re-entrant within a process: taking a lease this process already holds nests.
    """
    if settle_s is None:
        settle_s = SETTLE_S["uri" if storage.is_uri(directory) else "local"]
    with _HELD_LOCK:
        held = _HELD.get(_key(directory))
        if held is not None and held.lost is None:
            held._depth += 1
            return held
        path = storage.join(directory, LEASE_FILE)
        for _ in range(3):
            holder = read_holder(directory)
            if holder is not None:
                reason = stale_reason(holder)
                if reason is None:
                    raise LeaseHeldError(
                        f"{directory} is in use by another run: {describe(holder)}. Wait for "
                        f"it to finish or stop it; a lease whose holder is gone expires "
                        f"{float(holder.get('ttl_s', TTL_S)):g} s after its last heartbeat"
                    )
                log.warning("%s: taking over a stale lease (%s): %s", directory, reason, holder)
            now = time.time()
            record = {
                "token": uuid.uuid4().hex,
                "host": _host(),
                "pid": os.getpid(),
                "pid_namespace": _pid_namespace(),
                "process_started": _process_started(os.getpid()),
                "started": now,
                "heartbeat": now,
                "ttl_s": ttl_s,
                "what": what,
                "command": _command(),
            }
            storage.write_text(path, json.dumps(record))
            time.sleep(settle_s)
            back = read_holder(directory)
            if back is not None and back["token"] == record["token"]:
                lease = Lease(directory, record, heartbeat_s)
                lease.start_heartbeat()
                _HELD[_key(directory)] = lease
                return lease
            # Another run wrote after us: the next round finds its live lease and stops.
        raise LeaseHeldError(
            f"{directory}: could not take the lease (another run keeps claiming it)"
        )


@contextmanager
def hold_lease(directory: str, *, what: str = "", **kwargs) -> Iterator[Lease]:
    """``acquire_lease`` for the duration of a ``with`` block."""
    lease = acquire_lease(directory, what=what, **kwargs)
    try:
        yield lease
    finally:
        lease.release()


def check_held(directory: str) -> None:
    """Before committing results to ``directory``: raise ``LeaseLostError`` if this process
    held its lease and lost it. No-op where no lease was taken (plain library use)."""
    lease = _HELD.get(_key(directory))
    if lease is not None:
        lease.check()


def clear_dir(directory: str, keep: tuple[str, ...] = ()) -> None:
    """Remove everything in ``directory`` except its lease (and the entries in ``keep``):
    how a lease holder starts its output over without letting the lease go."""
    storage.delete_contents(directory, keep=(LEASE_FILE, *keep))
