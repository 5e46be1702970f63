"""The whole tiny Tuna pipeline with ``run_dir`` on S3 (a real S3 server on loopback): stopped
mid-run, its node's caches lost, resumed; models trained into the bucket are loaded from it."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from tests.support import assert_ok, run_cli
from tuna_ray import storage

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
STAGES = ["rank_probabilistic", "train_p", "sample", "rank_contextual", "train_c"]


def _stage_status(proc) -> dict[str, str]:
    start = proc.stdout.index('{\n  "run_dir"')  # the CLI's summary, amid Ray's output
    return json.JSONDecoder().raw_decode(proc.stdout[start:])[0]["stages"]


@pytest.fixture(scope="module")
def teacher(tiny_model_path):
    """The tiny teacher at one address for both runs. (An embedded server gets a new port per
    run, and the openai engine keys its cache on base_url: see the issue-9 report.)"""
    from tuna_ray.serve.local import start_local_server

    with start_local_server(str(tiny_model_path), served_model_name="teacher") as server:
        yield server


def test_pipeline_on_s3_stops_resumes_and_loads_models_from_the_bucket(
    tmp_path, monkeypatch, s3_server, teacher
):
    from transformers import AutoModelForCausalLM

    from tuna_ray.models import resolve_model

    started = time.time()
    monkeypatch.setenv("TUNA_RAY_NODE_CACHE", str(tmp_path / "node"))
    run_dir = s3_server.new_bucket() + "/runs/tiny"
    args = (
        "run",
        "--config",
        "jobs/configs/tiny-cpu.yaml",
        f"run_dir={run_dir}",
        f"probabilistic.engine.base_url={teacher.base_url}",
        # train_p dies at step 3 (after its checkpoint at step 2) and may not retry: the run
        # stops there, like a driver lost half-way. Operational settings: no hash changes.
        "train_p.checkpoint_every=2",
        "train_p.fail_at_step=3",
        "scaling.max_failures=0",
        "eval=null",  # the evaluation on object storage: tests/eval (and its cache) cover it
    )
    first = run_cli(*args, timeout=900)
    assert first.returncode != 0
    keys = s3_server.keys(run_dir)
    assert "rank_probabilistic/manifest.json" in keys, first.stderr[-4000:]
    assert any(k.startswith("train_p/checkpoint_step0000002/") for k in keys), keys
    assert "train_p/train_report.json" not in keys and "train_p/_lease.json" not in keys
    assert not any(k.startswith("sample/") for k in keys)
    # The teacher's responses were kept in the run storage, as compacted cache parts.
    assert [k for k in keys if k.startswith("rank_probabilistic/cache/part-")]

    # Lose the node (its SQLite response cache and staged models) and half of the first
    # stage's results: the rerun must finish that stage from the bucket, paying nothing.
    shutil.rmtree(tmp_path / "node", ignore_errors=True)
    rank_p = storage.join(run_dir, "rank_probabilistic")
    kept = [k for k in keys if k.startswith("rank_probabilistic/parts/")]
    for key in kept[1:]:
        storage.delete_file(storage.join(run_dir, key))
    for name in ("manifest.json", "ranked.parquet"):
        storage.delete_file(storage.join(rank_p, name))
    from tuna_ray.data.parts import finished_ids

    done_before = len(finished_ids(rank_p))
    assert 0 < done_before < 16

    teacher.reset_stats()
    second = run_cli(*args, timeout=1200)
    assert_ok(second)
    assert teacher.stats()["requests"] == 0  # every missing id came from the cache in S3
    # the two stages that ran before (one finished, then its outputs lost; one failed) resumed
    resumed = {"rank_probabilistic": "resumed", "train_p": "resumed"}
    assert _stage_status(second) == {**dict.fromkeys(STAGES, "ran"), **resumed}
    manifest = storage.read_json(storage.join(rank_p, "manifest.json"))
    assert manifest["counts"]["done_before"] == done_before
    assert manifest["usage_this_run"]["requests"] == 0
    assert manifest["usage_this_run"]["cached"] > 0
    # train_p resumed from its step-2 checkpoint instead of starting over.
    consumed = [
        storage.read_json(storage.join(run_dir, k))
        for k in s3_server.keys(run_dir)
        if k.startswith("train_p/consumed/")
    ]
    assert sorted({c["resumed_from_step"] for c in consumed}) == [0, 2], consumed

    # The final model lives in the bucket; resolve_model stages it for from_pretrained.
    model_uri = storage.join(run_dir, "train_c", "hf_model")
    AutoModelForCausalLM.from_pretrained(resolve_model(model_uri))
    assert storage.exists(storage.join(run_dir, "report.md"))

    again = run_cli(*args, timeout=600)  # finished: every stage skipped
    assert_ok(again)
    # as they ended, figures kept: a finished run's record is not overwritten by a no-op rerun
    assert _stage_status(again) == _stage_status(second)
    assert "starting embedded server" not in again.stderr
    print(f"S3 pipeline test wall time: {time.time() - started:.0f} s")
