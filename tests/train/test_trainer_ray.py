"""The training stage end to end: real Ray Train, real DeepSpeed, tiny random-weight llama.

Each run goes through the CLI in its own process, so a failed run never leaves a half-dead Ray
session behind for the next test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.support import assert_ok, run_cli, synthetic_ranked, write_jsonl

pytestmark = pytest.mark.slow


def _train(tmp_path: Path, model: Path, data: Path, name: str, *overrides: str):
    return run_cli(
        "train",
        "--config",
        "jobs/configs/train-tiny-cpu.yaml",
        f"model.name_or_path={model}",
        f"data.path={data}",
        f"run.storage_path={tmp_path / 'runs'}",
        f"run.name={name}",
        *overrides,
    )


def _report(tmp_path: Path, name: str) -> dict:
    return json.loads((tmp_path / "runs" / name / "train_report.json").read_text())


def _consumed(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "consumed").glob("rank*.json"))]


def _steps_to_ids(segments: list[dict]) -> dict[int, list[str]]:
    """Step -> ids consumed in it (all ranks); a step present twice would be a double count."""
    out: dict[int, list[str]] = {}
    for seg in segments:
        for step, ids in seg["steps"].items():
            out.setdefault(int(step), []).extend(ids)
    return out


def _load_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_workers_train_checkpoint_and_export(tmp_path, tiny_model_path, zero_stage):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "ranked.jsonl", synthetic_ranked(24))
    proc = _train(tmp_path, tiny_model_path, data, "run", f"train.zero_stage={zero_stage}")
    assert_ok(proc)
    report = _report(tmp_path, "run")
    metrics = report["final_metrics"]
    assert report["total_steps"] == 3 and metrics["step"] == 3  # 24 samples / (2 x 2 x 2)
    assert all(math.isfinite(metrics[k]) for k in ("loss", "ranking_loss", "mle_loss", "grad_norm"))
    assert 0.0 <= metrics["ranking_accuracy"] <= 1.0

    run_dir = tmp_path / "runs" / "run"
    last_ckpt = run_dir / "checkpoint_step0000003"
    assert (last_ckpt / "ckpt").is_dir() and (last_ckpt / "latest").read_text().strip() == "ckpt"
    # Both ranks' optimizer shards made it into the one checkpoint folder.
    assert len(list((last_ckpt / "ckpt").glob("*optim_states.pt"))) == 2

    exported = _load_state(run_dir / "hf_model")
    # An independent path to the trained weights: DeepSpeed's own consolidation of the shards.
    trained = get_fp32_state_dict_from_zero_checkpoint(str(last_ckpt), tag="ckpt")
    initial = _load_state(tiny_model_path)
    assert set(exported) <= set(trained)
    for name, tensor in exported.items():
        assert torch.equal(tensor, trained[name].to(tensor.dtype)), name
    # The tiny llama ties its output head to the input embedding: saved once (ZeRO-2's
    # consolidation lists the tied copy too, ZeRO-3's does not).
    assert set(trained) - set(exported) <= {"lm_head.weight"}
    if "lm_head.weight" in trained:
        assert torch.equal(trained["lm_head.weight"], trained["model.embed_tokens.weight"])
    assert any(not torch.equal(exported[n], initial[n]) for n in initial), "weights never moved"
    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf_model")
    assert model.config.vocab_size == exported["model.embed_tokens.weight"].shape[0]


def test_worker_killed_mid_run_recovers_from_checkpoint(tmp_path, tiny_model_path):
    records = synthetic_ranked(24)
    data = write_jsonl(tmp_path / "ranked.jsonl", records)
    proc = _train(
        tmp_path,
        tiny_model_path,
        data,
        "run",
        "train.epochs=2",
        "train.checkpoint_every=2",
        "train.fail_at_step=3",
        "train.fail_rank=1",
        "scaling.max_failures=1",
    )
    assert_ok(proc)
    run_dir = tmp_path / "runs" / "run"
    assert (run_dir / "fault_injected").exists()
    assert _report(tmp_path, "run")["final_metrics"]["step"] == 6

    segments = _consumed(run_dir)
    attempts = {s["attempt"]: s["resumed_from_step"] for s in segments}
    assert sorted(attempts.values()) == [0, 2], attempts  # second attempt began at checkpoint 2
    steps = _steps_to_ids(segments)
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    assert all(len(ids) == 8 for ids in steps.values())  # each step: one global batch
    consumed = sorted(i for ids in steps.values() for i in ids)
    assert consumed == sorted([r["id"] for r in records] * 2)  # each sample once per epoch


def test_rerun_after_driver_stops_resumes(tmp_path, tiny_model_path):
    data = write_jsonl(tmp_path / "ranked.jsonl", synthetic_ranked(24))
    args = (
        "train.epochs=2",
        "train.checkpoint_every=2",
        "train.fail_at_step=3",
        "scaling.max_failures=0",
    )
    first = _train(tmp_path, tiny_model_path, data, "run", *args)
    assert first.returncode != 0  # no retries allowed: the driver gives up
    run_dir = tmp_path / "runs" / "run"
    assert (run_dir / "checkpoint_step0000002").is_dir()
    assert not (run_dir / "train_report.json").exists()

    second = _train(tmp_path, tiny_model_path, data, "run", *args)  # same name, same storage
    assert_ok(second)
    segments = _consumed(run_dir)
    assert sorted({s["attempt"]: s["resumed_from_step"] for s in segments}.values()) == [0, 2]
    assert sorted(_steps_to_ids(segments)) == [1, 2, 3, 4, 5, 6]
    assert _report(tmp_path, "run")["final_metrics"]["step"] == 6


def test_loss_and_gradient_do_not_depend_on_batch_split(tmp_path, tiny_model_path):
    """One global batch of 4: 1 worker x 4 samples vs 2 workers x 2 micro-batches of 1."""
    data = write_jsonl(tmp_path / "ranked.jsonl", synthetic_ranked(8))
    common = ("train.max_steps=1", "train.export=false", "train.zero_stage=2")
    assert_ok(
        _train(
            tmp_path,
            tiny_model_path,
            data,
            "whole",
            *common,
            "scaling.num_workers=1",
            "train.micro_batch_size=4",
            "train.gradient_accumulation_steps=1",
        )
    )
    assert_ok(
        _train(
            tmp_path,
            tiny_model_path,
            data,
            "split",
            *common,
            "scaling.num_workers=2",
            "train.micro_batch_size=1",
            "train.gradient_accumulation_steps=2",
        )
    )
    whole = _report(tmp_path, "whole")["final_metrics"]
    split = _report(tmp_path, "split")["final_metrics"]
    for key in ("loss", "ranking_loss", "mle_loss", "grad_norm", "ranking_accuracy"):
        assert whole[key] == pytest.approx(split[key], rel=1e-5), key
