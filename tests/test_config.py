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


def _section_defaults():
    """(config class, field, default section) for every field whose default is a section."""
    import inspect

    from pydantic import BaseModel

    import tuna_ray.config as config_module
    import tuna_ray.pipeline.stages as pipeline_module

    for module in (config_module, pipeline_module):
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if not (issubclass(cls, config_module._Strict) and cls.__module__ == module.__name__):
                continue
            for name, field in cls.model_fields.items():
                if isinstance(field.default, BaseModel):
                    yield cls, name, field.default


SECTIONS = list(_section_defaults())


def test_every_section_default_is_found():
    names = {(cls.__name__, name) for cls, name, _ in SECTIONS}
    assert {
        ("PipelineConfig", "train_c"),
        ("PipelineConfig", "train_p"),
        ("TrainConfig", "optim"),
        ("SamplingStageBase", "sampling"),
        ("ContextualStageConfig", "judge_sampling"),
    } <= names


@pytest.mark.parametrize(
    "cls,name,default", SECTIONS, ids=[f"{c.__name__}.{n}" for c, n, _ in SECTIONS]
)
def test_a_partial_section_keeps_every_other_default(cls, name, default):
    """Setting one key of a section (``train_c.epochs=1``) must not reset the others to the
    class defaults (the contextual phase's 1e-6 learning rate, the judge's 2048 tokens)."""
    from tuna_ray.config import _Strict

    full = default.model_dump()
    key = next(iter(full))  # change one key, keep the rest
    value = full[key]
    changed = (not value) if isinstance(value, bool) else value
    section = {key: changed}
    required = {
        f: _minimal(cls, f)
        for f, info in cls.model_fields.items()
        if info.is_required() and f != name
    }
    built = cls.model_validate({**required, name: section})
    untouched = cls.model_validate(required)  # the defaults, after the model's own validators
    assert getattr(built, name).model_dump() == {
        **getattr(untouched, name).model_dump(),
        key: changed,
    }
    assert issubclass(cls, _Strict)


def _minimal(cls, field: str):
    """A minimal valid value for a required field of the stage and pipeline configs."""
    return {
        "student": {"name_or_path": "m"},
        "instructions": {"path": "d"},
        "model": {"name_or_path": "m"},
        "data": {"path": "d"},
        "input": {"path": "d"},
        "output_dir": "out",
        "engine": {"kind": "hf", "model": "m"},
    }[field]


def test_contextual_learning_rate_survives_a_command_line_override():
    from tuna_ray.pipeline import PipelineConfig

    cfg = load_config(
        None,
        ["student.name_or_path=m", "instructions.path=d", "train_c.epochs=1"],
        PipelineConfig,
    )
    assert cfg.train_c.optim.learning_rate == 1e-6 and cfg.train_p.optim.learning_rate == 1e-5


def test_override_without_equals_says_what_was_expected():
    with pytest.raises(ValueError, match="expected key=value"):
        load_config(None, ["model.name_or_path=m", "data.path=d", "train.epochs"])


def test_overrides_reach_list_items(tmp_path):
    from omegaconf import OmegaConf

    path = tmp_path / "c.yaml"
    OmegaConf.save(
        {
            "model": {"name_or_path": "m"},
            "data": {"path": "d"},
            "train": {"optim": {"betas": [0.9, 0.999]}},
        },
        path,
    )
    # one item of a list in the YAML, changed by its index
    assert load_config(path, ["train.optim.betas.0=0.5"]).train.optim.betas == (0.5, 0.999)
    # a whole list given on the command line, read as YAML
    assert load_config(path, ["train.optim.betas=[0.8,0.9]"]).train.optim.betas == (0.8, 0.9)
