"""Run storage: small helpers over pyarrow filesystems (a local path, s3://, gs://, ...).

Stages hand off through files under one run directory; these helpers let the same code write
there whether it is a local folder or an object store.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path

import pyarrow.fs as pafs


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of ``uri`` and the path inside it."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    if "://" in uri:
        return posixpath.join(uri, *parts)
    return str(Path(uri, *parts))


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(uri: str) -> str:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8")


def write_text(uri: str, text: str) -> None:
    """Write ``text`` to ``uri`` (parents created); readers never see a half-written file."""
    fs, path = filesystem(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    tmp = path + ".tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(text.encode("utf-8"))
    fs.move(tmp, path)


def read_json(uri: str):
    return json.loads(read_text(uri))


def write_json(uri: str, obj) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def list_files(uri: str) -> list[str]:
    """Full paths/URIs of the files directly under ``uri`` (empty if it does not exist)."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(
        join(uri, posixpath.basename(i.path)) for i in infos if i.type == pafs.FileType.File
    )


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local folder to ``uri`` (replacing files of the same name)."""
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(
        str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
    )


def delete_dir(uri: str) -> None:
    """Remove ``uri`` and everything under it (nothing happens if it does not exist)."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)
