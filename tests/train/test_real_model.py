"""The real SmolLM2-135M-Instruct learns a given ranking through the whole training stage.

Data: 24 shipped Alpaca instructions, each with its real answer (best) and a deliberately worse
one -- the answer's first sentence repeated four times. Repetition is cheap to predict, so the
untrained model mostly prefers the worse answer (its length-normalised log-likelihood is higher);
after a short Tuna run the order must have flipped for most pairs, while the likelihood of the
best answers must not collapse (the MLE term keeps it up).
"""

from __future__ import annotations

import json
from statistics import mean

import pytest

from tests.support import SHIPPED, write_jsonl

pytestmark = pytest.mark.slow


def _pairs(n: int) -> list[dict]:
    alpaca = json.loads((SHIPPED / "alpaca_data_first200.json").read_text())
    short = [a for a in alpaca if len(a["output"]) < 160 and not a["input"]][:n]
    assert len(short) == n
    pairs = []
    for i, a in enumerate(short):
        first_sentence = a["output"].split(".")[0].strip() + "."
        pairs.append(
            {
                "id": f"alpaca-{i}",
                "instruction": a["instruction"],
                "input": "",
                "responses": [a["output"], " ".join([first_sentence] * 4)],
            }
        )
    return pairs


def _scores(model_dir, records) -> list[list[float]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuna_ray.train.evaluate import score_candidates

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return score_candidates(model, tokenizer, records, template="chat", max_length=128)


def test_smollm2_learns_the_given_ranking(tmp_path, smollm2_path, ray_session):
    from tuna_ray.config import TrainJobConfig, load_config
    from tuna_ray.train.evaluate import ranking_accuracy
    from tuna_ray.train.trainer import run_training

    records = _pairs(24)
    data = write_jsonl(tmp_path / "pairs.jsonl", records)
    before = _scores(smollm2_path, records)
    overrides = [
        "model.name_or_path=builtin:smollm2-135m-instruct",
        "model.template=chat",
        f"data.path={data}",
        "train.epochs=1",
        "train.micro_batch_size=4",
        "train.gradient_accumulation_steps=1",
        "train.max_length=128",
        "train.zero_stage=0",
        "train.gradient_checkpointing=false",
        "train.optim.learning_rate=2e-4",
        "train.checkpoint_every=100",
        "scaling.num_workers=1",
        "scaling.cpus_per_worker=2",
        f"run.storage_path={tmp_path / 'runs'}",
        "run.name=real",
    ]
    # in this process, on the session's Ray (test_trainer_ray.py runs `tuna-ray train` itself)
    run_training(load_config("jobs/configs/train-tiny-cpu.yaml", overrides, TrainJobConfig))
    after = _scores(tmp_path / "runs" / "real" / "hf_model", records)

    acc_before, acc_after = ranking_accuracy(before), ranking_accuracy(after)
    print(f"pairwise ranking accuracy {acc_before:.3f} -> {acc_after:.3f}")
    assert acc_before < 0.5  # the premise: the untrained model prefers repetition
    assert acc_after >= acc_before + 0.25
    best_before, best_after = mean(s[0] for s in before), mean(s[0] for s in after)
    print(f"mean log-prob per token of the best answers {best_before:.3f} -> {best_after:.3f}")
    assert best_after > best_before - 0.25  # MLE keeps the good answers likely
