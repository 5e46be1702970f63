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

from tests.support import PATIENT_S, REPO, SHIPPED, assert_ok, run_cli, run_here

# Stage runs go through the CLI's code in this process, on the session's Ray (run_here);
# a run a test stops, or whose workers need this test's environment, gets its own process.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]


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
        proc = run_here(
            *_args(
                tiny_server,
                data,
                out,
                "input.limit=null",
                "engine.timeout_s=1.5",
                "engine.max_retries=2",
                "engine.backoff_base_s=0.05",
                "max_failure_share=1.0",  # this test counts; the bound has its own test
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
        run_here(
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
    tiny_server.set_faults(1.0, kinds=["slow"], slow_seconds=1.0)  # slow enough to interrupt
    tiny_server.reset_stats()
    data = _instructions(tmp_path, 24)
    out = tmp_path / "out"
    args = _args(
        tiny_server, data, out, "scaling.actors=1", "scaling.batch_size=2", "engine.cache_dir=null"
    )
    log = tmp_path / "first-run.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tuna_ray", *args],
            cwd=REPO,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.time() + PATIENT_S
        while len(list((out / "parts").glob("part-*.parquet"))) < 3:
            why = "no progress before the kill:\n" + log.read_text()[-3000:]
            assert time.time() < deadline and proc.poll() is None, why
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, once
        # The driver stops its stage and exits 130; on a busy machine that can take a while
        # (Ray's shutdown), so the wait is long, but a second Ctrl-C is never sent: a swallowed
        # first one would show as a stage that finished (all 24 ids) or as this wait running out.
        proc.wait(timeout=PATIENT_S / 3)
        assert proc.returncode == 130, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    tiny_server.set_faults(0.0)
    from tuna_ray.data.parts import finished_ids

    done = finished_ids(str(out))
    assert 0 < len(done) < 24 and not (out / "manifest.json").exists()
    tiny_server.reset_stats()
    assert_ok(run_here(*args))
    # One sampling request per instruction not finished before (no cache, drop rule: no resample).
    assert tiny_server.stats()["requests"] == 24 - len(done)
    ended = [r["id"] for r in _ranked(out)] + [f["id"] for f in _failures(out)]
    assert sorted(ended) == sorted(_all_ids(data))


def _all_ids(path: Path) -> list[str]:
    from tuna_ray.data.readers import read_instructions

    return [r["id"] for r in read_instructions(path).records]


def _patient_timeout_s(server, prompt: str, *, max_tokens: int, queue: int) -> float:
    """A first-attempt timeout for this machine as it is now: time the stage's two kinds of
    request (n=4 sampling, an echo re-read; after a warm-up) and allow for ``queue`` requests
    ahead of one (the server runs one at a time), four times over. The engine stretches it
    further if the machine gets busier during the run."""
    from tuna_ray.engines.base import Prompt, SamplingParams
    from tuna_ray.engines.openai_engine import OpenAIEngine, OpenAIEngineConfig

    config = OpenAIEngineConfig(
        base_url=server.base_url, model="teacher", endpoint="completions", timeout_s=900
    )
    engine, probe = OpenAIEngine(config), Prompt("t", text=prompt)
    engine.sample([probe], SamplingParams(n=1, max_tokens=2))  # warm-up
    started = time.monotonic()
    (samples,) = engine.sample([probe], SamplingParams(n=4, max_tokens=max_tokens))
    engine.score(probe, [s.text for s in samples] + [" A reference."])
    engine.close()
    return min(900.0, max(30.0, 4 * queue * (time.monotonic() - started)))


def test_real_teacher_scores_match_a_direct_computation(tmp_path, smollm2_path):
    """SmolLM2-135M as the teacher, 2 Ray Data actors, the secret key never written anywhere.

    Holds on a busy machine: the timeouts come from the model's measured speed (and adapt in
    the engine), and the assertions are what the stage guarantees, not timing luck: every id
    ends ranked or failed with a reason, the run fails loudly when more than
    max_failure_share failed, and every ranked score is the teacher's own mean log-prob."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuna_ray.data.readers import read_ranked
    from tuna_ray.data.templates import render_prompt
    from tuna_ray.serve.local import start_local_server
    from tuna_ray.train.features import tokenize_candidates

    secret = f"sk-test-{uuid.uuid4().hex}"
    os.environ["TUNA_TEST_TEACHER_KEY"] = secret
    n = 12
    data = _instructions(tmp_path, n, start=20)
    out, cache = tmp_path / "out", tmp_path / "cache"
    actors, concurrency = 2, 4
    clock = time.monotonic()
    with start_local_server(str(smollm2_path), served_model_name="teacher") as server:
        probe = json.loads(data.read_text())[0]
        timeout = _patient_timeout_s(
            server,
            render_prompt(probe["instruction"], probe["input"]),
            max_tokens=24,
            queue=actors * concurrency,
        )
        probed = time.monotonic()
        proc = run_cli(
            *_args(
                server,
                data,
                out,
                "engine.endpoint=completions",
                "engine.api_key_env=TUNA_TEST_TEACHER_KEY",
                f"engine.cache_dir={cache}",
                f"engine.timeout_s={timeout:.0f}",
                f"engine.max_concurrency={concurrency}",
                "sampling.max_tokens=24",
                f"scaling.actors={actors}",
                "scaling.batch_size=3",
                "include_reference=true",
            ),
            timeout=3000,
        )
    print(
        f"server up and probed in {probed - clock:.0f} s: first-attempt timeout {timeout:.0f} s;"
        f" the stage took {time.monotonic() - probed:.0f} s"
    )
    del os.environ["TUNA_TEST_TEACHER_KEY"]
    ranked, failed = _ranked(out), _failures(out)
    ids = [r["id"] for r in ranked] + [f["id"] for f in failed]
    assert sorted(ids) == sorted(_all_ids(data)), proc.stderr[-3000:]  # each id, exactly once
    assert all(f["reason"] for f in failed)
    report = json.loads((out / "manifest.json").read_text())
    assert report["failure_share"] == pytest.approx(len(failed) / n)
    if report["failure_share"] > report["max_failure_share"]:  # never quietly thinned
        assert proc.returncode != 0 and report["status"] == "failed"
        assert "records failed" in proc.stderr
    else:
        assert_ok(proc)
        assert report["status"] == "ok"
    assert ranked, f"nothing ranked in {timeout:.0f} s per attempt: {failed[:3]}"
    assert all(r["scores"] == sorted(r["scores"], reverse=True) for r in ranked)
    assert all("reference" in r["origins"] for r in ranked)
    assert all(json.loads(r["generator"])["scoring"] == "echo" for r in ranked)

    # Every candidate -- samples and reference alike -- was re-read by the teacher after the
    # same prompt: its score is the mean token log-prob computed directly with transformers.
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path).eval()
    diffs = []
    with torch.no_grad():
        for rec in ranked[:4]:
            ex = tokenize_candidates(rec["prompt"], rec["responses"], tokenizer, max_length=4096)
            assert ex.kept_ranks == list(range(len(rec["responses"])))
            for ids, p, score in zip(ex.input_ids, ex.prompt_len, rec["scores"]):
                ids = torch.tensor([ids[:-1]])  # EOS is not an answer token of the teacher's
                logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
                token_lp = logp.gather(-1, ids[0, 1:, None]).squeeze(-1)[p - 1 :]
                diffs.append(abs(token_lp.mean().item() - score))
    assert max(diffs) < 1e-3, sorted(diffs)[-5:]

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


def test_too_many_failures_stop_the_stage_and_a_rerun_retries_only_them(tmp_path, tiny_server):
    """Half the requests answered 500 and no retries: the run writes what it has, reports the
    share, exits non-zero in one line; the rerun sends only the failed ids and finishes."""
    tiny_server.set_faults(0.5, kinds=["500"], seed=5)
    tiny_server.reset_stats()
    data = _instructions(tmp_path, 24)
    out = tmp_path / "out"
    # Only the injected 500s may fail: patience for a busy machine (timeout_s is operational).
    args = _args(tiny_server, data, out, "engine.cache_dir=null", "engine.timeout_s=300")
    try:
        failing = run_here(*args, "engine.max_retries=0")
    finally:
        tiny_server.set_faults(0.0)
    assert failing.returncode != 0
    summary = [line for line in failing.stderr.splitlines() if "records failed" in line]
    assert len(summary) == 1 and "> max_failure_share 5.0%" in summary[0], failing.stderr[-2000:]
    assert "http 500 x" in summary[0] and "rerun to retry the failed ids" in summary[0]
    report = json.loads((out / "manifest.json").read_text())
    failed = _failures(out)
    assert report["status"] == "failed" and report["config_hash"] is None
    assert 0 < len(failed) < 24 and report["failure_share"] == round(len(failed) / 24, 4)
    assert report["counts"]["failure_reasons"] == {"http 500": len(failed)}
    assert len(_ranked(out)) + len(failed) == 24  # what was paid for is kept

    tiny_server.reset_stats()
    assert_ok(run_here(*args, "engine.max_retries=4"))  # retries are operational: same stage
    assert tiny_server.stats()["requests"] == len(failed)  # only the failed ids, once each
    report = json.loads((out / "manifest.json").read_text())
    assert report["status"] == "ok" and report["config_hash"] and report["failure_share"] == 0
    assert sorted(r["id"] for r in _ranked(out)) == sorted(_all_ids(data))


def test_combinations_the_endpoint_cannot_serve_are_refused_before_any_request(tmp_path):
    from pydantic import ValidationError

    from tuna_ray.config import ProbabilisticStageConfig

    base = {
        "input": {"path": "x.json"},
        "output_dir": str(tmp_path),
        "engine": {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"},
    }

    def config(**fields):
        merged = {**base, **fields}
        engine = fields.get("engine", {})
        merged["engine"] = engine if "kind" in engine else {**base["engine"], **engine}
        return ProbabilisticStageConfig.model_validate(merged)

    cases = {  # fields -> what the message must name
        "reference over chat": (
            {"include_reference": True, "engine": {"endpoint": "chat"}},
            ["include_reference: true", "engine.endpoint: chat", "completions"],
        ),
        "echo over chat": ({"scoring": "echo"}, ["scoring: echo", "engine.endpoint: chat"]),
        "reference scored as sampled": (
            {
                "include_reference": True,
                "scoring": "sampled",
                "engine": {"endpoint": "completions"},
            },
            ["include_reference: true", "scoring: echo"],
        ),
        "chat template over completions": (
            {"template": "chat", "engine": {"endpoint": "completions"}},
            ["template: chat", "engine.endpoint: chat"],
        ),
    }
    for name, (fields, words) in cases.items():
        with pytest.raises(ValidationError) as err:
            config(**fields)
        assert all(w in str(err.value) for w in words), (name, str(err.value))
    ok = config(include_reference=True, engine={"endpoint": "completions"})
    assert ok.score_by_echo and not config().score_by_echo
    hf = {"kind": "hf", "model": "builtin:tiny-llama"}  # re-reads in-process: any template
    assert config(engine=hf, template="chat", include_reference=True).score_by_echo


def test_shipped_configs_have_a_servable_teacher():
    """Every shipped teacher section validates (the 7B configs' chat teacher among them)."""
    from omegaconf import OmegaConf

    from tuna_ray.config import ProbabilisticStageConfig

    sections = {}
    for path in sorted((REPO / "jobs" / "configs").glob("*.yaml")):
        raw = OmegaConf.to_container(OmegaConf.load(path))
        if "variant" in raw and raw.get("probabilistic"):  # a pipeline config
            sections[path.name] = {
                "input": {"path": "x"},
                "output_dir": "o",
                **raw["probabilistic"],
            }
        elif path.name.startswith("rank-probabilistic"):
            sections[path.name] = raw
    assert {"llama-7b-8gpu.yaml", "llama-7b-2x8gpu.yaml", "demo-cpu.yaml"} <= set(sections)
    for name, section in sections.items():
        cfg = ProbabilisticStageConfig.model_validate(section)  # raises, naming the fields
        assert cfg.score_by_echo == cfg.include_reference, name


def test_bad_instructions_are_named_or_counted(tmp_path, tiny_server):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"id": "a", "instruction": "ok"}\n{"id": "b"}\n{"id": "c", "instruction": "  "}\n'
        '{"id": "a", "instruction": "again"}\nnot json\n'
    )
    out = tmp_path / "out"
    strict = run_here(*_args(tiny_server, path, out))
    assert strict.returncode == 2 and f"{path} line 2" in strict.stderr
    assert_ok(run_here(*_args(tiny_server, path, out, "input.on_error=skip")))
    report = json.loads((out / "manifest.json").read_text())
    assert report["input"]["skipped"] == {
        "missing_field": 1,
        "empty_field": 1,
        "duplicate_id": 1,
        "bad_json": 1,
    }
    assert [r["id"] for r in _ranked(out)] == ["a"]
