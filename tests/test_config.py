"""Config loading: YAML + dotted overrides, strict validation, paper defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from tuna_ray.config import TrainJobConfig, config_hash, load_config


def test_yaml_plus_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {name_or_path: m}\ndata: {path: d.jsonl}\ntrain: {epochs: 2}\n")
    cfg = load_config(path, ["train.optim.learning_rate=3e-6", "scaling.num_workers=4"])
    assert cfg.train.epochs == 2 and cfg.train.optim.learning_rate == 3e-6
    assert cfg.scaling.num_workers == 4
    assert Path(cfg.run.storage_path).is_absolute()


def test_unknown_keys_are_errors_not_silent_defaults():
    with pytest.raises(ValidationError, match="train.lr"):
        load_config(None, ["model.name_or_path=m", "data.path=d", "train.lr=1"])


def test_defaults_are_the_papers():
    tc = TrainJobConfig(model={"name_or_path": "m"}, data={"path": "d"}).train
    assert (tc.optim.learning_rate, tc.epochs, tc.micro_batch_size, tc.max_length) == (
        1e-5,
        1,
        16,
        512,
    )
    assert (tc.margin, tc.mle_weight, tc.mle_target) == (0.1, 1.0, "all")
    assert (tc.optim.warmup_steps, tc.optim.schedule, tc.optim.betas) == (2, "cosine", (0.9, 0.999))
    assert tc.zero_stage == 3 and tc.gradient_checkpointing


def test_config_hash_is_stable_and_sensitive():
    a = TrainJobConfig(model={"name_or_path": "m"}, data={"path": "d"})
    b = TrainJobConfig(model={"name_or_path": "m"}, data={"path": "d"})
    assert config_hash(a) == config_hash(b)
    b.train.margin = 0.2
    assert config_hash(a) != config_hash(b)
