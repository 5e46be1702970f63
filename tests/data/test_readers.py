"""Readers: every invalid kind raises with file/line/field or is counted when skipped; every
format round-trips; the reference format imports sorted and exports back."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from tuna_ray.data.readers import (
    derive_id,
    export_reference_format,
    read_instructions,
    read_ranked,
    write_jsonl,
    write_parquet,
)
from tuna_ray.data.records import RecordError
from tuna_ray.data.templates import render_prompt

ALPACA_200 = Path("/work/shared/data/alpaca/alpaca_data_first200.json")


def good(i: int) -> dict:
    return {"id": f"g{i}", "instruction": f"Question {i}?", "responses": [f"best {i}", "worse"]}


def line(obj: dict) -> bytes:
    return json.dumps(obj).encode() + b"\n"


# Each case: the bad line (bytes), its kind, and the field the error must name.
BAD_CASES = {
    "missing_field": (line({"id": "m", "instruction": "Q?"}), "responses"),
    "wrong_type": (line({"id": "w", "instruction": "Q?", "responses": ["a", 3]}), "responses[1]"),
    "too_few_responses": (line({"id": "f", "instruction": "Q?", "responses": ["a"]}), "responses"),
    "empty_response": (
        line({"id": "e", "instruction": "Q?", "responses": ["a", " \t\n"]}),
        "responses[1]",
    ),
    "duplicate_id": (line(dict(good(1), instruction="Other?")), "id"),
    "bad_utf8": (b'{"id": "u", "instruction": "caf\xe9", "responses": ["a", "b"]}\n', None),
    "bad_json": (b'{"id": "j", "instruction": "Q?", "responses": ["a", "b"]\n', None),
}


def write_with_bad(tmp_path: Path, bad: bytes) -> Path:
    """good 0, a blank line, good 1, good 2, then the bad record on line 5, then good 3."""
    path = tmp_path / "ranked.jsonl"
    body = line(good(0)) + b"\n" + line(good(1)) + line(good(2)) + bad + line(good(3))
    path.write_bytes(body)
    return path


@pytest.mark.parametrize("kind", sorted(BAD_CASES))
def test_bad_record_raises_with_file_line_field(tmp_path, kind):
    bad, field = BAD_CASES[kind]
    path = write_with_bad(tmp_path, bad)
    with pytest.raises(RecordError) as info:
        read_ranked(path)
    error = info.value
    assert (error.kind, error.line, error.field, error.path) == (kind, 5, field, str(path))
    message = str(error)
    assert message.startswith(f"{path} line 5")
    if field:
        assert f"field '{field}'" in message


@pytest.mark.parametrize("kind", sorted(BAD_CASES))
def test_bad_record_skipped_and_counted(tmp_path, kind):
    path = write_with_bad(tmp_path, BAD_CASES[kind][0])
    result = read_ranked(path, on_error="skip")
    assert result.skipped == {kind: 1}
    assert [r["id"] for r in result.records] == ["g0", "g1", "g2", "g3"]
    assert result.num_read == 5 and result.num_skipped == 1
    assert [(e.kind, e.line) for e in result.errors] == [(kind, 5)]


def test_error_message_format_and_pickle(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(line(good(0)) + line({"id": "abc", "prompt": "P", "responses": ["only"]}))
    with pytest.raises(RecordError) as info:
        read_ranked(path)
    expected = (
        f"{path} line 2, field 'responses': needs at least 2 non-empty answers, got 1 (id=abc)"
    )
    assert str(info.value) == expected
    assert str(pickle.loads(pickle.dumps(info.value))) == expected


def test_duplicate_id_names_first_occurrence(tmp_path):
    path = write_with_bad(tmp_path, BAD_CASES["duplicate_id"][0])
    with pytest.raises(RecordError, match=r"duplicate id, first seen at line 3 \(id=g1\)"):
        read_ranked(path)


def test_json_array_rows_and_skip_counts(tmp_path):
    items = [
        good(0),
        {"id": "x", "instruction": "Q?", "responses": "not a list"},
        good(1),
        good(1),
        {"id": "y", "responses": ["a", "b"]},
    ]
    path = tmp_path / "ranked.json"
    path.write_text(json.dumps(items))
    with pytest.raises(RecordError, match=r"ranked\.json row 2, field 'responses'"):
        read_ranked(path)
    result = read_ranked(path, on_error="skip")
    assert result.skipped == {"wrong_type": 1, "duplicate_id": 1, "missing_prompt": 1}
    assert [r["id"] for r in result.records] == ["g0", "g1"]


def test_broken_json_array_always_raises_with_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n{"id": "a"},\n{oops}\n]')
    with pytest.raises(RecordError, match=r"broken\.json line 3: not valid JSON") as info:
        read_ranked(path, on_error="skip")
    assert info.value.line == 3


def ranked_records() -> list[dict]:
    return [
        {
            "id": "a",
            "instruction": "Q a?",
            "input": "ctx",
            "prompt": None,
            "responses": ["x", "y", "z"],
            "scores": [3.0, 2.0, -1.5],
            "ranking": "contextual",
            "judge_raw": "1 > 2 > 3",
            "source": "test",
            "reference": "the dataset's own answer",
            "generator": "student",
        },
        {
            "id": "b",
            "instruction": None,
            "input": "",
            "prompt": "RAW PROMPT ü",
            "responses": ["p", "q"],
            "scores": None,
            "ranking": None,
            "judge_raw": None,
            "source": None,
            "reference": None,
            "generator": None,
        },
    ]


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet", "hf"])
def test_round_trip_every_format(tmp_path, fmt):
    records = ranked_records()
    if fmt == "json":
        path = tmp_path / "r.json"
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    elif fmt == "jsonl":
        path = write_jsonl(records, tmp_path / "r.jsonl")
    elif fmt == "parquet":
        path = write_parquet(records, tmp_path / "r.parquet")
    else:
        import datasets

        path = tmp_path / "hf_saved"
        datasets.Dataset.from_list(records).save_to_disk(str(path))
    result = read_ranked(path)
    assert result.records == records
    assert result.skipped == {} and result.num_read == 2


def test_instruction_round_trip_parquet(tmp_path):
    records = read_instructions(ALPACA_200).records[:5]
    path = write_parquet(records, tmp_path / "i.parquet")
    assert read_instructions(path).records == records


def test_reference_format_import_sorts_stably(tmp_path):
    items = [
        {
            "id": 7,
            "instruction": "PROMPT:",
            "output": ["o0", "o1", "o2", "o3"],
            "score": [0.5, 2, 0.5, 3.0],
        }
    ]
    path = tmp_path / "ref.json"
    path.write_text(json.dumps(items))
    (record,) = read_ranked(path).records
    assert record["id"] == "7"
    assert record["prompt"] == "PROMPT:" and record["instruction"] is None
    assert record["responses"] == ["o3", "o1", "o0", "o2"]  # ties 0.5: o0 before o2
    assert record["scores"] == [3.0, 2.0, 0.5, 0.5]
    assert record["ranking"] == "probabilistic"


def test_reference_format_bad_scores_name_the_file_field(tmp_path):
    path = tmp_path / "ref.jsonl"
    path.write_bytes(line({"id": "a", "instruction": "P", "output": ["x", "y"], "score": [1]}))
    with pytest.raises(RecordError, match=r"line 1, field 'score': has 1 scores for 2 outputs"):
        read_ranked(path)


def test_reference_format_export_round_trip(tmp_path):
    records = ranked_records()
    exported = export_reference_format(records)
    assert exported[0]["instruction"] == render_prompt("Q a?", "ctx")
    assert exported[1] == {
        "id": "b",
        "instruction": "RAW PROMPT ü",
        "output": ["p", "q"],
        "score": [1.0, 0.0],
    }
    path = write_jsonl(exported, tmp_path / "ref.jsonl")
    reread = read_ranked(path).records
    assert [r["responses"] for r in reread] == [r["responses"] for r in records]
    assert export_reference_format(reread) == exported


def test_alpaca_instructions_with_stable_ids():
    first = read_instructions(ALPACA_200)
    assert first.num_read == 200 and len(first.records) == 200 and first.skipped == {}
    record = first.records[0]
    assert record["id"] == derive_id(record["instruction"], record["input"])
    assert record["id"].startswith("sha1-") and len(record["id"]) == 21
    assert record["reference"] and record["instruction"] == "Give three tips for staying healthy."
    assert [r["id"] for r in read_instructions(ALPACA_200).records] == [
        r["id"] for r in first.records
    ]
    assert any(r["input"] for r in first.records)


def test_alpaca_as_sft_needs_min_responses_one():
    sft = read_ranked(ALPACA_200, min_responses=1).records
    assert len(sft) == 200 and sft[0]["ranking"] == "sft" and len(sft[0]["responses"]) == 1
    with pytest.raises(RecordError, match=r"row 1, field 'output': needs at least 2"):
        read_ranked(ALPACA_200)


def test_identical_instruction_and_input_are_duplicates(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text(json.dumps([{"instruction": "Same?", "input": "", "output": "a"}] * 2))
    result = read_instructions(path, on_error="skip")
    assert len(result.records) == 1 and result.skipped == {"duplicate_id": 1}


def test_unknown_extension_and_bad_on_error(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("id\n")
    with pytest.raises(RecordError, match="cannot tell the format"):
        read_ranked(path)
    with pytest.raises(ValueError, match="on_error"):
        read_ranked(path, on_error="ignore")


# ---- what is missing is named (issue 9) -------------------------------------------------------


def test_missing_file_names_the_reason(tmp_path):
    for name in ("gone.parquet", "gone.jsonl", "gone.json"):
        with pytest.raises(
            FileNotFoundError, match=f"^cannot read {tmp_path / name}: no such file$"
        ):
            read_instructions(tmp_path / name)


def test_parquet_without_instruction_column_names_that_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "texts.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "label": [1, 2]}), path)
    for on_error in ("raise", "skip"):  # a whole-file problem: skipping rows would hide it
        with pytest.raises(RecordError) as err:
            read_instructions(path, on_error=on_error)
        assert str(err.value) == (
            f"{path}, field 'instruction': has no 'instruction' column (columns: text, label)"
        )
    with pytest.raises(RecordError, match="has no 'instruction' or 'prompt' column"):
        read_ranked(path)


def test_record_without_id_or_instruction_names_instruction(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"input": "only input"}\n')
    with pytest.raises(RecordError, match=r"line 1, field 'instruction': is required but missing"):
        read_instructions(path)


def test_reads_from_object_storage(s3_server):
    from tuna_ray import storage

    root = s3_server.new_bucket()
    storage.write_text(f"{root}/i.jsonl", '{"id": "a", "instruction": "Q?"}\n')
    storage.write_text(f"{root}/i.json", '[{"id": "b", "instruction": "Q?"}]')
    assert [r["id"] for r in read_instructions(f"{root}/i.jsonl").records] == ["a"]
    assert [r["id"] for r in read_instructions(f"{root}/i.json").records] == ["b"]
