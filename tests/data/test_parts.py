"""Incremental stage output: durable parts, resume by id, consolidation, failures."""

from __future__ import annotations

import json

from tuna_ray.data import parts
from tuna_ray.data.readers import read_ranked


def _rec(i: str) -> dict:
    return {
        "id": i,
        "instruction": f"q{i}",
        "input": "",
        "responses": ["a", "b"],
        "scores": [-1.0, -2.0],
        "ranking": "probabilistic",
    }


def test_parts_resume_and_consolidate_in_input_order(tmp_path):
    out = str(tmp_path / "stage")
    parts.write_part(out, [_rec("b"), _rec("c")], [{"id": "a", "reason": "timeout"}])
    parts.write_part(out, [], [{"id": "d", "reason": "missing logprobs"}])
    assert parts.finished_ids(out) == {"b", "c"}
    assert not list((tmp_path / "stage" / "parts").glob("*.tmp"))
    parts.write_part(out, [_rec("a")], [])  # a succeeded on a later attempt
    path, records, failed = parts.consolidate(out, "ranked", order=["a", "b", "c", "d"])
    assert [r["id"] for r in records] == ["a", "b", "c"]
    assert failed == [{"id": "d", "reason": "missing logprobs"}]
    lines = (tmp_path / "stage" / "failures.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["d"]
    # The consolidated file is what the trainer reads.
    read = read_ranked(path)
    assert [r["id"] for r in read.records] == ["a", "b", "c"]


def test_manifest_round_trip(tmp_path):
    out = str(tmp_path / "s")
    assert parts.read_manifest(out) is None
    parts.write_manifest(out, {"config_hash": "abc", "counts": {"ranked": 3}})
    assert parts.read_manifest(out)["counts"] == {"ranked": 3}
