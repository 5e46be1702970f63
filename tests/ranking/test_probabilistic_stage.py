"""The probabilistic ranking stage end to end: Ray Data actors, the real openai client, real
HTTP to ``tuna-ray serve`` on loopback. Faults are injected by the server, never the client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.support import REPO, SHIPPED, assert_ok, run_cli

pytestmark = pytest.mark.slow


def _instructions(tmp_path: Path, n: int, start: int = 0) -> Path:
    alpaca = json.loads((SHIPPED / "alpaca_data_first200.json").read_text())[start : start + n]
    path = tmp_path / "instructions.json"
    path.write_text(json.dumps(alpaca))
    return path


def _args(server, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "rank-probabilistic",
        "--config",
        "jobs/configs/rank-probabilistic-tiny.yaml",
        f"input.path={data}",
        f"output_dir={out}",
        f"engine.base_url={server.base_url}",
        *extra,
    ]


def _ranked(out: Path) -> list[dict]:
    return pq.read_table(out / "ranked.parquet").to_pylist()


def _failures(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_server(tiny_model_path):
    from tuna_ray.serve.local import start_local_server

    with start_local_server(str(tiny_model_path), served_model_name="teacher") as server:
        yield server


def test_faults_of_every_kind_lose_nothing_and_rerun_is_free(tmp_path, tiny_server):
    # Seed 2 draws every fault kind within its first 28 requests (of 60+ here).
    tiny_server.set_faults(0.2, seed=2, slow_seconds=3.0)
    tiny_server.reset_stats()
    data = _instructions(tmp_path, 60)
    out = tmp_path / "out"
    try:
        proc = run_cli(
            *_args(
                tiny_server,
                data,
                out,
                "input.limit=null",
                "engine.timeout_s=1.5",
                "engine.max_retries=2",
                "engine.backoff_base_s=0.05",
            )
        )
    finally:
        faults = tiny_server.stats()["faults"]
        tiny_server.set_faults(0.0)
    assert_ok(proc)
    assert set(faults) == {"429", "500", "slow", "drop", "malformed", "no_logprobs"}, faults
    ranked, failed = _ranked(out), _failures(out)
    ids = [r["id"] for r in ranked] + [f["id"] for f in failed]
    assert len(ids) == len(set(ids)) == 60  # none lost, none duplicated
    print(
        f"injected {faults}; ranked {len(ranked)}, failed {len(failed)}: "
        f"{sorted(f['reason'] for f in failed)}"
    )
    assert all(f["reason"] for f in failed)
    report = json.loads((out / "manifest.json").read_text())
    assert report["counts"]["ranked"] == len(ranked) and report["counts"]["failed"] == len(failed)
    assert report["usage_this_run"]["retries"] > 0

    tiny_server.reset_stats()
    # The same stage again -- with a new timeout and retry budget, which change how it runs,
    # not what it produces: skipped, nothing re-requested, nothing discarded.
    assert_ok(
        run_cli(
            *_args(
                tiny_server,
                data,
                out,
                "input.limit=null",
                "engine.timeout_s=30",
                "engine.max_retries=5",
            )
        )
    )
    assert tiny_server.stats()["requests"] == 0
    assert len(_ranked(out)) == len(ranked)


def test_interrupted_run_resumes_with_only_the_missing_ids(tmp_path, tiny_server):
    tiny_server.set_faults(1.0, kinds=["slow"], slow_seconds=0.4)  # slow enough to interrupt
    tiny_server.reset_stats()
    data = _instructions(tmp_path, 24)
    out = tmp_path / "out"
    args = _args(
        tiny_server, data, out, "scaling.actors=1", "scaling.batch_size=2", "engine.cache_dir=null"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "tuna_ray", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        while len(list((out / "parts").glob("part-*.parquet"))) < 3:
            assert time.time() < deadline and proc.poll() is None, "no progress before the kill"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    tiny_server.set_faults(0.0)
    from tuna_ray.data.parts import finished_ids

    done = finished_ids(str(out))
    assert 0 < len(done) < 24 and not (out / "manifest.json").exists()
    tiny_server.reset_stats()
    assert_ok(run_cli(*args))
    # One sampling request per instruction not finished before (no cache, drop rule: no resample).
    assert tiny_server.stats()["requests"] == 24 - len(done)
    ended = [r["id"] for r in _ranked(out)] + [f["id"] for f in _failures(out)]
    assert sorted(ended) == sorted(_all_ids(data))


def _all_ids(path: Path) -> list[str]:
    from tuna_ray.data.readers import read_instructions

    return [r["id"] for r in read_instructions(path).records]


def test_real_teacher_scores_match_a_direct_computation(tmp_path, smollm2_path):
    """SmolLM2-135M as the teacher, 2 Ray Data actors, the secret key never written anywhere."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuna_ray.data.readers import read_ranked
    from tuna_ray.serve.local import start_local_server
    from tuna_ray.train.features import tokenize_candidates

    secret = f"sk-test-{uuid.uuid4().hex}"
    os.environ["TUNA_TEST_TEACHER_KEY"] = secret
    data = _instructions(tmp_path, 20, start=20)
    out, cache = tmp_path / "out", tmp_path / "cache"
    with start_local_server(str(smollm2_path), served_model_name="teacher") as server:
        proc = run_cli(
            *_args(
                server,
                data,
                out,
                "engine.endpoint=completions",
                "engine.api_key_env=TUNA_TEST_TEACHER_KEY",
                f"engine.cache_dir={cache}",
                "sampling.max_tokens=24",
                "scaling.actors=2",
                "scaling.batch_size=5",
                "include_reference=true",
            )
        )
    del os.environ["TUNA_TEST_TEACHER_KEY"]
    assert_ok(proc)
    ranked = _ranked(out)
    assert sorted(r["id"] for r in ranked) == sorted(_all_ids(data))
    assert all(r["scores"] == sorted(r["scores"], reverse=True) for r in ranked)
    assert all("reference" in r["origins"] for r in ranked)

    # Mean token log-prob of each answer after its prompt, computed directly with transformers.
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path).eval()
    diffs = []
    with torch.no_grad():
        for rec in ranked[:8]:
            ex = tokenize_candidates(rec["prompt"], rec["responses"], tokenizer, max_length=4096)
            for ids, p, score in zip(ex.input_ids, ex.prompt_len, rec["scores"]):
                ids = torch.tensor([ids[:-1]])  # the teacher's answers carry no EOS
                logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
                token_lp = logp.gather(-1, ids[0, 1:, None]).squeeze(-1)[p - 1 :]
                diffs.append(abs(token_lp.mean().item() - score))
    # Sampled token ids and a re-tokenisation of their text can differ at a merge; most agree.
    close = sum(d < 1e-3 for d in diffs)
    assert close >= 0.9 * len(diffs), sorted(diffs)[-5:]

    records = read_ranked(out / "ranked.parquet").records  # what the trainer reads
    assert len(records) == len(ranked) and all(len(r["responses"]) >= 2 for r in records)

    leaks = [
        p
        for p in [*out.rglob("*"), *cache.rglob("*")]
        if p.is_file() and secret.encode() in p.read_bytes()
    ]
    assert not leaks and secret not in proc.stdout + proc.stderr
    ray_logs = Path("/tmp/ray/session_latest/logs")
    if ray_logs.exists():
        assert not [
            p for p in ray_logs.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()
        ]


def test_bad_instructions_are_named_or_counted(tmp_path, tiny_server):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"id": "a", "instruction": "ok"}\n{"id": "b"}\n{"id": "c", "instruction": "  "}\n'
        '{"id": "a", "instruction": "again"}\nnot json\n'
    )
    out = tmp_path / "out"
    strict = run_cli(*_args(tiny_server, path, out), timeout=120)
    assert strict.returncode == 2 and f"{path} line 2" in strict.stderr
    assert_ok(run_cli(*_args(tiny_server, path, out, "input.on_error=skip")))
    report = json.loads((out / "manifest.json").read_text())
    assert report["input"]["skipped"] == {
        "missing_field": 1,
        "empty_field": 1,
        "duplicate_id": 1,
        "bad_json": 1,
    }
    assert [r["id"] for r in _ranked(out)] == ["a"]
