"""Read and write record files: JSON (Alpaca), JSON lines, Parquet, Hugging Face datasets.

Stage: data. Readers validate every record against ``records.py`` and either raise the first
``RecordError`` (``on_error="raise"``) or skip and count it (``on_error="skip"``); nothing is
dropped without being counted in ``ReadResult.skipped``.

Where a problem is reported: JSON lines by 1-based *line* (blank lines count as lines but hold
no record; a line with bad UTF-8 or bad JSON is reported on its own); JSON arrays, Parquet and
HF datasets by 1-based *row*. A JSON array that does not parse, or a file that is not UTF-8,
is one error for the whole file and always raises; so is a missing file, and a Parquet file
without the text column (``instruction``; for ranked records ``instruction`` or ``prompt``).
JSON, JSON lines and Parquet may also live at a pyarrow URI (``s3://``, ``gs://``), where the
pipeline's stages write them.

Input shapes accepted besides the native schema:
- Alpaca (``instruction, input, output``): ``output`` is the ``reference`` of an instruction
  record, or the single ``responses=[output]`` (``ranking="sft"``) of a ranked record.
- The reference code's training format (``id, instruction`` = rendered prompt, ``output[N]``,
  ``score[N]``; detected by ``output`` being a list): ``prompt`` = that text, responses sorted
  by score, highest first, ties kept in file order, ``ranking="probabilistic"``.
A record without ``id`` gets ``"sha1-" + sha1(instruction + "\\x00" + input)[:16]`` (for the
reference format the instruction is the rendered prompt), so rereading gives the same ids and
two records with the same instruction and input are reported as duplicates.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from tuna_ray import storage
from tuna_ray.data.records import (
    DEFAULT_MIN_RESPONSES,
    InstructionRecord,
    RankedRecord,
    RecordError,
    error_from_validation,
)
from tuna_ray.data.templates import render_prompt

OnError = Literal["raise", "skip"]
MAX_KEPT_ERRORS = 100
_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass
class ReadResult:
    """Valid records as plain dicts, and an account of what was skipped and why."""

    records: list[dict] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # kind -> count
    errors: list[RecordError] = field(default_factory=list)  # first MAX_KEPT_ERRORS skipped
    num_read: int = 0  # records (or broken lines) seen, valid or not

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


class NoRecordsError(ValueError):
    """A stage has nothing to work on, or produced nothing; names the stage and why."""


def require_records(records: list, read: ReadResult, path: str, stage: str) -> None:
    """Raise ``NoRecordsError`` when ``records`` (what ``stage`` kept of ``read``) is empty:
    an empty or fully skipped input is an error, never an empty success."""
    if records:
        return
    if read.num_read == 0:
        why = f"{path} holds no records"
    else:
        first = f"; first: {read.errors[0]}" if read.errors else ""
        why = f"all {read.num_read} records of {path} were skipped ({read.skipped}{first})"
    raise NoRecordsError(f"{stage}: nothing to do: {why}")


def derive_id(instruction: str, input: str = "") -> str:
    """Stable id of an instruction: ``"sha1-"`` + 16 hex digits of sha1(instruction \\0 input)."""
    digest = hashlib.sha1(f"{instruction}\x00{input}".encode()).hexdigest()
    return f"sha1-{digest[:16]}"


# ---------------------------------------------------------------- raw items from each format


def _detect_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    local = Path(path)
    if local.is_dir():
        if any((local / marker).exists() for marker in _HF_MARKERS):
            return "hf"
        raise RecordError(f"folder is not a saved HF dataset (none of {_HF_MARKERS})", path=path)
    suffix = local.suffix.lower()
    if suffix in (".json", ".jsonl", ".parquet"):
        return suffix[1:]
    raise RecordError(
        f"cannot tell the format from {suffix or 'no extension'!r}; pass fmt='json', 'jsonl', "
        "'parquet' or 'hf'",
        path=path,
    )


def _jsonl_items(path: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object or RecordError) per non-blank line."""
    data = storage.read_bytes(path)
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield (
                number,
                RecordError(
                    f"not valid UTF-8 (byte {exc.start + 1} of the line)",
                    path=path,
                    line=number,
                    kind="bad_utf8",
                ),
            )
            continue
        if number == 1:
            text = text.removeprefix("\ufeff")
        if not text.strip():
            continue
        try:
            yield number, json.loads(text)
        except json.JSONDecodeError as exc:
            yield (
                number,
                RecordError(
                    f"not valid JSON ({exc.msg} at column {exc.colno})",
                    path=path,
                    line=number,
                    kind="bad_json",
                ),
            )


def _json_items(path: str) -> Iterator[tuple[int, Any]]:
    data = storage.read_bytes(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise RecordError("not valid UTF-8", path=path, line=line, kind="bad_utf8") from exc
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(
            f"not valid JSON ({exc.msg} at column {exc.colno}); a .json file must hold one "
            "array of records (use .jsonl for one record per line)",
            path=path,
            line=exc.lineno,
            kind="bad_json",
        ) from exc
    if not isinstance(items, list):
        raise RecordError(
            f"a .json file must hold an array of records, got {type(items).__name__}",
            path=path,
            kind="wrong_type",
        )
    yield from enumerate(items, start=1)


def _parquet_items(path: str, kind: str) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(pa.BufferReader(storage.read_bytes(path)))
    # A file without the text column fails as a whole, naming the column it lacks (row by
    # row it would read as "id missing": ids are derived from that text).
    needed = ("instruction",) if kind == "instruction" else ("instruction", "prompt")
    if table.num_rows and not any(c in table.column_names for c in needed):
        raise RecordError(
            f"has no {' or '.join(repr(c) for c in needed)} column "
            f"(columns: {', '.join(table.column_names) or 'none'})",
            path=path,
            field=needed[0],
            kind="missing_field",
        )
    yield from enumerate(table.to_pylist(), start=1)


def _hf_items(path: str) -> Iterator[tuple[int, Any]]:
    """Rows of a ``save_to_disk`` folder, or of hub dataset ``"name[:split]"``."""
    import datasets

    if Path(path).is_dir():
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded and len(loaded) != 1:
                raise RecordError(
                    f"saved DatasetDict has splits {sorted(loaded)} and no 'train'; save the "
                    "split to read on its own",
                    path=path,
                )
            loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    else:
        name, _, split = path.partition(":")
        loaded = datasets.load_dataset(name, split=split or "train")
    yield from enumerate(loaded, start=1)


_ITEM_READERS = {
    "jsonl": lambda path, kind: _jsonl_items(path),
    "json": lambda path, kind: _json_items(path),
    "parquet": _parquet_items,
    "hf": lambda path, kind: _hf_items(path),
}


# ---------------------------------------------------------------- shapes -> native schema


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _instruction_fields(raw: dict) -> tuple[dict, dict[str, str]]:
    """Native instruction fields and a map from native field name back to the file's name."""
    renamed: dict[str, str] = {}
    item = dict(raw)
    if "reference" not in item and "output" in item:
        item["reference"] = item.pop("output")
        renamed["reference"] = "output"
    return item, renamed


def _ranked_fields(raw: dict) -> tuple[dict, dict[str, str]]:
    item = dict(raw)
    output = item.get("output")
    if "responses" in item or output is None:
        return item, {}
    if isinstance(output, list):  # the reference code's training format
        scores = item.pop("score", None)
        if not isinstance(scores, list) or not all(_number(s) for s in scores):
            raise RecordError(
                "needs a list of numbers aligned with 'output'", field="score", kind="wrong_type"
            )
        if len(scores) != len(output):
            raise RecordError(
                f"has {len(scores)} scores for {len(output)} outputs",
                field="score",
                kind="length_mismatch",
            )
        # sorted() is stable: equal scores keep file order.
        order = sorted(range(len(output)), key=lambda i: -scores[i])
        item.pop("output")
        item["prompt"] = item.pop("instruction", None)
        item["responses"] = [output[i] for i in order]
        item["scores"] = [float(scores[i]) for i in order]
        item.setdefault("ranking", "probabilistic")
        return item, {"responses": "output", "scores": "score", "prompt": "instruction"}
    item["responses"] = [item.pop("output")]  # Alpaca: one reference answer (SFT)
    item.setdefault("ranking", "sft")
    return item, {"responses": "output"}


def _with_id(item: dict) -> dict:
    if item.get("id") is None:
        text = item.get("instruction")
        if text is None:
            text = item.get("prompt")
        if isinstance(text, str):
            item["id"] = derive_id(text, item.get("input") or "")
        elif text is None:  # the id would come from the text: name what is really missing
            raise RecordError("is required but missing", field="instruction", kind="missing_field")
    return item


# ---------------------------------------------------------------- the readers


def _read(
    path: str | Path, kind: str, on_error: OnError, min_responses: int, fmt: str
) -> ReadResult:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = str(path)
    fmt = _detect_format(path, fmt)
    if fmt not in _ITEM_READERS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {sorted(_ITEM_READERS)}")
    if fmt != "hf" and not storage.exists(path):
        raise FileNotFoundError(f"cannot read {path}: no such file")
    unit = "line" if fmt == "jsonl" else "row"
    model = InstructionRecord if kind == "instruction" else RankedRecord
    shape = _instruction_fields if kind == "instruction" else _ranked_fields
    context = {"min_responses": min_responses}
    result = ReadResult()
    skipped: Counter[str] = Counter()
    first_seen: dict[str, int] = {}

    for number, raw in _ITEM_READERS[fmt](path, kind):
        result.num_read += 1
        try:
            result.records.append(_validate(raw, model, shape, context, first_seen, number, unit))
        except RecordError as error:
            error.path, error.line, error.unit = path, number, unit
            error.args = (str(error),)
            if on_error == "raise":
                raise
            skipped[error.kind] += 1
            if len(result.errors) < MAX_KEPT_ERRORS:
                result.errors.append(error)
    result.skipped = dict(skipped)
    return result


def _validate(
    raw: Any, model, shape, context: dict, first_seen: dict[str, int], number: int, unit: str
) -> dict:
    if isinstance(raw, RecordError):
        raise raw
    if not isinstance(raw, dict):
        raise RecordError(
            f"a record must be a JSON object, got {type(raw).__name__}", kind="wrong_type"
        )
    record_id = raw.get("id")
    record_id = None if record_id is None else str(record_id)
    try:
        item, renamed = shape(raw)
        item = _with_id(item)
        record_id = item.get("id") if isinstance(item.get("id"), str) else record_id
        record = model.model_validate(item, context=context).model_dump()
    except RecordError as error:
        error.record_id = record_id
        raise
    except ValidationError as exc:
        kind, field_name, reason = error_from_validation(exc)
        if field_name:
            head, sep, tail = field_name.partition("[")
            field_name = renamed.get(head, head) + sep + tail
        raise RecordError(reason, field=field_name, record_id=record_id, kind=kind) from exc
    if record["id"] in first_seen:
        raise RecordError(
            f"duplicate id, first seen at {unit} {first_seen[record['id']]}",
            field="id",
            record_id=record["id"],
            kind="duplicate_id",
        )
    first_seen[record["id"]] = number
    return record


def read_instructions(
    path: str | Path, *, on_error: OnError = "raise", fmt: str = "auto"
) -> ReadResult:
    """Read instruction records (``InstructionRecord`` dicts) from a file or dataset."""
    return _read(path, "instruction", on_error, DEFAULT_MIN_RESPONSES, fmt)


def read_ranked(
    path: str | Path,
    *,
    on_error: OnError = "raise",
    min_responses: int = DEFAULT_MIN_RESPONSES,
    fmt: str = "auto",
) -> ReadResult:
    """Read ranked records (``RankedRecord`` dicts, best response first).

    ``min_responses=1`` reads SFT data such as an Alpaca file.
    ``fmt``: ``"auto"`` (by extension, or a ``save_to_disk`` folder), ``"json"``, ``"jsonl"``,
    ``"parquet"``, or ``"hf"`` (a folder, or a hub id ``"name[:split]"``).
    """
    return _read(path, "ranked", on_error, min_responses, fmt)


# ---------------------------------------------------------------- writers and export


def export_reference_format(
    records: Iterable[dict], *, template: str = "alpaca", tokenizer: Any = None
) -> list[dict]:
    """Ranked records -> the reference code's ``{id, instruction, output, score}`` items.

    ``instruction`` is the record's ``prompt`` when it has no instruction, else the rendered
    template. Records without scores get ``N-1, ..., 0`` so the order survives re-import.
    """
    exported = []
    for record in records:
        if record.get("instruction") is not None:
            prompt = render_prompt(
                record["instruction"],
                record.get("input") or "",
                template=template,
                tokenizer=tokenizer,
            )
        else:
            prompt = record["prompt"]
        responses = list(record["responses"])
        scores = record.get("scores")
        if scores is None:
            scores = [float(len(responses) - 1 - i) for i in range(len(responses))]
        exported.append(
            {
                "id": record["id"],
                "instruction": prompt,
                "output": responses,
                "score": [float(s) for s in scores],
            }
        )
    return exported


def write_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    """Write one JSON object per line (UTF-8, non-ASCII kept); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
    return path


def write_parquet(records: Iterable[dict], path: str | Path) -> Path:
    """Write records as one Parquet table; returns the path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(list(records)), path)
    return path
