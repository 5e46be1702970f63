"""The pipeline's plan: each stage's digest covers its own section and the digests of the stages
it reads from, so a changed section re-runs that stage and every stage after it, and an
operational setting re-runs nothing. (The pipeline skips a stage whose finished output carries
its digest: tests/test_pipeline.py shows both on a real run; this checks every section.)"""

from __future__ import annotations

import pytest

from tuna_ray.config import load_config
from tuna_ray.pipeline.stages import PipelineConfig, plan

# The tests' config and the shipped 7B configs (vLLM engines, judge endpoint, s3:// run_dir).
CONFIGS = [
    "jobs/configs/tiny-cpu.yaml",
    "jobs/configs/llama-7b-8gpu.yaml",
    "jobs/configs/llama-7b-2x8gpu.yaml",
]
STAGES = ["rank_probabilistic", "train_p", "sample", "rank_contextual", "train_c", "eval"]


def _digests(config: str, *overrides: str) -> dict[str, str]:
    return {s.name: s.digest for s in plan(load_config(config, list(overrides), PipelineConfig))}


@pytest.mark.parametrize(
    "override, first_changed",
    [
        ("instructions.limit=12", "rank_probabilistic"),
        ("probabilistic.sampling.max_tokens=13", "rank_probabilistic"),
        ("train_p.optim.learning_rate=2e-3", "train_p"),
        ("sampling.sampling.temperature=0.7", "sample"),
        ("contextual.judge_sampling.max_tokens=200", "rank_contextual"),
        ("train_c.optim.learning_rate=2e-4", "train_c"),
        ("eval.generation.max_tokens=17", "eval"),
        ("eval.bootstrap.resamples=300", "eval"),
    ],
)
@pytest.mark.parametrize("config", CONFIGS)
def test_a_changed_section_changes_its_stage_and_every_later_one(config, override, first_changed):
    before, after = _digests(config), _digests(config, override)
    assert list(before) == STAGES
    changed = [name for name in STAGES if after[name] != before[name]]
    assert changed == STAGES[STAGES.index(first_changed) :]


@pytest.mark.parametrize(
    "override",
    [
        "probabilistic.engine.max_concurrency=3",
        "probabilistic.scaling.actors=2",
        "train_p.checkpoint_every=2",
        "train_c.fail_at_step=3",
        "scaling.max_failures=0",
        "eval.scaling.batch_size=4",
    ],
)
@pytest.mark.parametrize("config", CONFIGS)
def test_an_operational_setting_changes_no_digest(config, override):
    assert _digests(config, override) == _digests(config)
