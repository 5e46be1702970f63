"""Run storage: small helpers over pyarrow filesystems (a local path, s3://, gs://, ...).

Stages hand off through files under one run directory; these helpers let the same code write
there whether it is a local folder or an object store.

Writes that fail for a filesystem reason (read-only, permission denied, disk full, a path under
a regular file, an unreachable bucket) raise ``StorageError``: one line naming the location and
the reason, which the CLI prints as is. ``check_writable`` finds such a location before any work.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs


class StorageError(OSError):
    """Run storage cannot be written (or read) for a filesystem reason; names where and why.

    >>> str(StorageError("cannot write to /data/run: Read-only file system"))
    'cannot write to /data/run: Read-only file system'
    """


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` locations (s3://, gs://, file://), False for plain paths."""
    return "://" in str(path)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of ``uri`` and the path inside it."""
    if is_uri(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    if is_uri(uri):
        return posixpath.join(uri, *parts)
    return str(Path(uri, *parts))


def os_reason(exc: BaseException) -> str:
    """The OS's words for ``exc`` ("No space left on device"), else its first line."""
    errno = getattr(exc, "errno", None)
    if errno:
        return os.strerror(errno)
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@contextmanager
def named_errors(action: str, uri: str, *, keep_not_found: bool = False) -> Iterator[None]:
    """Turn an ``OSError`` inside the block into ``StorageError("cannot ACTION URI: reason")``.

    ``keep_not_found``: let ``FileNotFoundError`` through (a read of a missing file is the
    caller's business, not a storage fault).
    """
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as exc:
        if keep_not_found:
            raise
        raise StorageError(f"cannot {action} {uri}: {os_reason(exc)}") from exc
    except OSError as exc:
        raise StorageError(f"cannot {action} {uri}: {os_reason(exc)}") from exc


def node_cache_dir() -> Path:
    """Node-local scratch that outlives a run but is never shared between nodes: staged copies
    of models kept in object storage, the response cache's local SQLite layer.

    ``$TUNA_RAY_NODE_CACHE``, else ``node/`` under ``$TUNA_RAY_CACHE`` (``~/.cache/tuna-ray``).
    """
    explicit = os.environ.get("TUNA_RAY_NODE_CACHE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("TUNA_RAY_CACHE", Path.home() / ".cache" / "tuna-ray")) / "node"


def check_writable(uri: str) -> None:
    """Create folder ``uri`` if needed, write a probe file in it and delete it again.

    Raises ``StorageError`` naming ``uri`` and the reason when that fails, so a run whose
    output cannot be written stops before it starts Ray or sends a request.
    """
    fs, path = filesystem(uri)
    with named_errors("write to", uri):
        if fs.get_file_info(path).type == pafs.FileType.File:
            raise StorageError(f"cannot write to {uri}: it is a file, not a folder")
        fs.create_dir(path, recursive=True)
        probe = posixpath.join(path, f".write-probe-{uuid.uuid4().hex}")
        with fs.open_output_stream(probe) as f:
            f.write(b"tuna-ray write probe\n")
        fs.delete_file(probe)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    with named_errors("look up", uri):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = filesystem(uri)
    with named_errors("look up", uri):
        return fs.get_file_info(path).type == pafs.FileType.Directory


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with named_errors("read", uri, keep_not_found=True), fs.open_input_stream(path) as f:
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` (parents created); readers never see a half-written file."""
    fs, path = filesystem(uri)
    with named_errors("write", uri):
        fs.create_dir(posixpath.dirname(path), recursive=True)
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"  # unique: concurrent writers never share one
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)


def write_text(uri: str, text: str) -> None:
    """Write ``text`` to ``uri`` (parents created); readers never see a half-written file."""
    write_bytes(uri, text.encode("utf-8"))


def read_json(uri: str):
    return json.loads(read_text(uri))


def write_json(uri: str, obj) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def list_files(uri: str) -> list[str]:
    """Full paths/URIs of the files directly under ``uri`` (empty if it does not exist)."""
    fs, path = filesystem(uri)
    with named_errors("list", uri):
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return []
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(
        join(uri, posixpath.basename(i.path)) for i in infos if i.type == pafs.FileType.File
    )


def walk_files(uri: str) -> list[tuple[str, int, float]]:
    """``(path relative to uri, size, mtime)`` of every file below ``uri``, sorted by path."""
    fs, path = filesystem(uri)
    with named_errors("list", uri):
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            return []
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    root = path.rstrip("/") + "/"
    out = []
    for i in infos:
        if i.type == pafs.FileType.File:
            mtime = i.mtime.timestamp() if i.mtime is not None else 0.0
            out.append((i.path[len(root) :], int(i.size or 0), mtime))
    return sorted(out)


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local folder to ``uri`` (replacing files of the same name)."""
    fs, path = filesystem(uri)
    with named_errors("write", uri):
        fs.create_dir(path, recursive=True)
        pafs.copy_files(
            str(local_dir),
            path,
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=fs,
        )


def download_dir(uri: str, local_dir: str | Path) -> None:
    """Copy folder ``uri`` (recursively) into the local folder ``local_dir``."""
    fs, path = filesystem(uri)
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    with named_errors("download", uri):
        pafs.copy_files(
            path,
            str(local_dir),
            source_filesystem=fs,
            destination_filesystem=pafs.LocalFileSystem(),
        )


def delete_file(uri: str) -> None:
    """Remove one file (nothing happens if it does not exist)."""
    fs, path = filesystem(uri)
    with named_errors("delete", uri):
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)


def delete_dir(uri: str) -> None:
    """Remove ``uri`` and everything under it (nothing happens if it does not exist)."""
    fs, path = filesystem(uri)
    with named_errors("delete", uri):
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)


def delete_contents(uri: str, keep: tuple[str, ...] = ()) -> None:
    """Remove everything directly under folder ``uri`` except the entries named in ``keep``."""
    fs, path = filesystem(uri)
    with named_errors("delete", uri):
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            return
        for info in fs.get_file_info(pafs.FileSelector(path, recursive=False)):
            if posixpath.basename(info.path) in keep:
                continue
            if info.type == pafs.FileType.Directory:
                fs.delete_dir(info.path)
            elif info.type == pafs.FileType.File:
                fs.delete_file(info.path)
