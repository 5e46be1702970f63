"""The response cache lives with the run: durable parts in run storage, SQLite on the node."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO, SHIPPED, assert_ok, run_cli
from tuna_ray import storage
from tuna_ray.engines import cache as cache_module
from tuna_ray.engines.cache import ResponseCache

_WRITER = """
import sys
from tuna_ray.engines.cache import ResponseCache
cache = ResponseCache(sys.argv[1])
for i in range(int(sys.argv[2])):
    cache.put(f"k{i}", {"i": i})
# no flush: leaving the process writes the rest
"""


def _write_in_a_process(folder: str, n: int, node_cache: Path) -> None:
    env = {**os.environ, "TUNA_RAY_NODE_CACHE": str(node_cache)}
    proc = subprocess.run(
        [sys.executable, "-c", _WRITER, folder, str(n)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("where", ["local", "s3"])
def test_entries_survive_the_loss_of_the_node(tmp_path, monkeypatch, where, request):
    if where == "s3":
        folder = request.getfixturevalue("s3_server").new_bucket() + "/run/stage/cache"
    else:
        folder = str(tmp_path / "run" / "stage" / "cache")
    old_node = tmp_path / "node-a"
    _write_in_a_process(folder, 300, old_node)  # > FLUSH_EVERY: one part early, one at exit
    names = [p.rsplit("/", 1)[-1] for p in storage.list_files(folder)]
    assert sorted(n.split("-")[0] for n in names) == ["cache", "part", "part"]
    shutil.rmtree(old_node)  # the node is gone, and its SQLite with it

    monkeypatch.setenv("TUNA_RAY_NODE_CACHE", str(tmp_path / "node-b"))
    fresh = ResponseCache(folder)
    assert fresh.get("k0") == {"i": 0} and fresh.get("k299") == {"i": 299} and len(fresh) == 300
    assert str(fresh.local_path).startswith(str(tmp_path / "node-b"))


def test_boundary_flush_and_compaction(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNA_RAY_NODE_CACHE", str(tmp_path / "node"))
    folder = str(tmp_path / "cache")
    cache = ResponseCache(folder)
    cache.put("a", [1])
    assert [p for p in storage.list_files(folder) if p.endswith(".jsonl")] == []
    cache_module.flush_all()  # what a stage does before it writes an output part
    cache.put("b", [2])
    cache_module.flush_all()
    cache_module.flush_all()  # nothing new: no empty part
    assert len([p for p in storage.list_files(folder) if p.endswith(".jsonl")]) == 2
    assert cache_module.compact(folder) == 2
    (merged,) = [p for p in storage.list_files(folder) if p.endswith(".jsonl")]
    assert sorted(json.loads(line)["key"] for line in Path(merged).read_text().splitlines()) == [
        "a",
        "b",
    ]
    shutil.rmtree(tmp_path / "node")
    again = ResponseCache(folder)
    assert again.get("a") == [1] and again.get("b") == [2]


def test_a_deleted_durable_cache_is_not_served_from_the_node(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNA_RAY_NODE_CACHE", str(tmp_path / "node"))
    folder = str(tmp_path / "cache")
    first = ResponseCache(folder)
    first.put("a", [1])
    first.close()
    shutil.rmtree(folder)  # the user threw the run's cache away on purpose
    assert ResponseCache(folder).get("a") is None


# ---- a stage on S3 rerun on a fresh node ------------------------------------------------------


@pytest.mark.slow
def test_stage_rerun_on_a_fresh_node_sends_no_request(tmp_path, monkeypatch, s3_server):
    """The run storage (S3) keeps the responses: a rerun with a new node cache and a changed
    result setting (the stage re-runs all its instructions) reaches the server 0 times."""
    from tuna_ray.serve.local import start_local_server

    monkeypatch.setenv("TUNA_RAY_NODE_CACHE", str(tmp_path / "node"))
    data = tmp_path / "instructions.json"
    data.write_text(json.dumps(json.loads((SHIPPED / "alpaca_data_first200.json").read_text())[:8]))
    out = s3_server.new_bucket() + "/run/rank_probabilistic"

    with start_local_server(mode="fixed") as server:

        def run(*extra: str):
            return run_cli(
                "rank-probabilistic",
                "--config",
                "jobs/configs/rank-probabilistic-tiny.yaml",
                f"input.path={data}",
                f"output_dir={out}",
                f"engine.base_url={server.base_url}",
                "engine.model=fixed",
                f"engine.cache_dir={out}/cache",
                "scaling.actors=2",
                "scaling.batch_size=2",
                *extra,
            )

        assert_ok(run())
        first = server.stats()["requests"]
        assert first == 8
        keys = s3_server.keys(out)
        assert "cache/cache-id.txt" in keys and any(k.startswith("cache/part-") for k in keys)
        shutil.rmtree(tmp_path / "node")  # a new node: its SQLite is empty
        server.reset_stats()
        assert_ok(run("min_candidates=3"))  # changes the results' hash: every id runs again
        assert server.stats()["requests"] == 0
        manifest = json.loads(storage.read_text(out + "/manifest.json"))
        assert manifest["counts"]["done_before"] == 0
        assert manifest["usage_this_run"]["cached"] == 8
        assert manifest["usage_this_run"]["requests"] == 0
