"""Incremental, resumable stage output: Parquet parts, a failures log, a manifest.

Stage: data (shared by every generation/ranking stage). A stage's output directory holds

    parts/part-<uuid>.parquet      records, written by the workers one batch at a time
    failures/part-<uuid>.jsonl     {"id", "reason", "detail"} for what failed after retries
    usage/part-<uuid>.json         what the batch cost (requests, tokens, cost): totals over
                                   every run that worked on the stage, resumes included
    <name>.parquet                 all parts consolidated, when the stage finishes
    manifest.json                  counts, config hash, timing -- only when the stage finished
    _lease.json                    the run writing here now (tuna_ray.lease)
    cache/                         the engine's response cache (pipeline default, engines/cache.py)

A part is written to a temporary name and renamed, so a crash (or Ctrl-C) loses at most the
batches in flight; a rerun removes the temporary files left behind (``clean_stale_tmp``),
reads the ids of finished parts and skips them. Paths may be local
or any pyarrow filesystem URI (s3://, gs://).
"""

from __future__ import annotations

import json
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from tuna_ray import storage


def write_part(
    output_dir: str, records: list[dict], failures: list[dict], usage: dict | None = None
) -> None:
    """Durably write one batch of results (either list may be empty) and what it cost."""
    tag = uuid.uuid4().hex
    if usage:
        storage.write_text(
            storage.join(output_dir, "usage", f"part-{tag}.json"), json.dumps(usage) + "\n"
        )
    if records:
        storage.write_bytes(
            storage.join(output_dir, "parts", f"part-{tag}.parquet"),
            _parquet_bytes(pa.Table.from_pylist(records)),
        )
    if failures:
        storage.write_text(
            storage.join(output_dir, "failures", f"part-{tag}.jsonl"),
            "".join(json.dumps(f, sort_keys=True) + "\n" for f in failures),
        )


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def clean_stale_tmp(output_dir: str) -> int:
    """Delete the ``*.tmp`` files a crashed run left behind; returns how many.

    A part is written as ``<name>.tmp`` and renamed, so a ``.tmp`` file is a batch that never
    finished. Call it only while no worker writes to ``output_dir`` (before a stage starts).
    """
    removed = 0
    for folder in (
        output_dir,
        storage.join(output_dir, "parts"),
        storage.join(output_dir, "failures"),
        storage.join(output_dir, "usage"),
    ):
        for path in storage.list_files(folder):
            if path.endswith(".tmp"):
                storage.delete_file(path)
                removed += 1
    return removed


def read_usage(output_dir: str) -> dict[str, float]:
    """The usage of every batch written so far, summed field by field."""
    total: dict[str, float] = {}
    for part in storage.list_files(storage.join(output_dir, "usage")):
        if part.endswith(".json"):
            for key, value in json.loads(storage.read_text(part)).items():
                total[key] = total.get(key, 0) + value
    return total


def read_parts(output_dir: str) -> list[dict]:
    """All records written so far, in no particular order."""
    records: list[dict] = []
    for part in storage.list_files(storage.join(output_dir, "parts")):
        if part.endswith(".parquet"):
            records.extend(pq.read_table(pa.BufferReader(storage.read_bytes(part))).to_pylist())
    return records


def read_failures(output_dir: str) -> list[dict]:
    """Failures written so far; an id that later succeeded is not removed here."""
    out: list[dict] = []
    for part in storage.list_files(storage.join(output_dir, "failures")):
        if part.endswith(".jsonl"):
            out.extend(json.loads(line) for line in storage.read_text(part).splitlines() if line)
    return out


def finished_ids(output_dir: str) -> set[str]:
    return {r["id"] for r in read_parts(output_dir)}


def consolidate(output_dir: str, name: str, order: list[str]) -> tuple[str, list[dict], list[dict]]:
    """Write ``<name>.parquet`` (records in input ``order``) and ``failures.jsonl``.

    Failures of ids that succeeded on a later attempt are dropped; each remaining failed id is
    reported once, with its latest reason. Returns (path, records, failures).
    """
    records = {r["id"]: r for r in read_parts(output_dir)}
    rank = {i: k for k, i in enumerate(order)}
    ordered = sorted(records.values(), key=lambda r: rank.get(r["id"], len(rank)))
    failures = {f["id"]: f for f in read_failures(output_dir) if f["id"] not in records}
    failed = sorted(failures.values(), key=lambda f: rank.get(f["id"], len(rank)))
    path = storage.join(output_dir, f"{name}.parquet")
    storage.write_bytes(
        path, _parquet_bytes(pa.Table.from_pylist(ordered) if ordered else pa.table({}))
    )
    storage.write_text(
        storage.join(output_dir, "failures.jsonl"),
        "".join(json.dumps(f, sort_keys=True) + "\n" for f in failed),
    )
    return path, ordered, failed


def read_manifest(output_dir: str) -> dict | None:
    path = storage.join(output_dir, "manifest.json")
    return storage.read_json(path) if storage.exists(path) else None


def write_manifest(output_dir: str, manifest: dict) -> None:
    storage.write_json(storage.join(output_dir, "manifest.json"), manifest)
