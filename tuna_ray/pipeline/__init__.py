"""The Tuna schedule: one config, stages run one after another, each resumable.

    tuna-ray run --config jobs/configs/demo-cpu.yaml
    ray job submit --working-dir . -- python jobs/tuna.py --config jobs/configs/llama-7b-8gpu.yaml

Variants (METHOD.md): ``tuna_p`` = probabilistic ranking -> train Tuna_p; ``tuna_c`` = student
sampling from the start model -> contextual ranking -> train; ``tuna`` = both, the second
starting from Tuna_p. An optional SFT stage comes first, an optional evaluation last. Every
stage writes under ``run_dir/<stage>/`` (a local path or a pyarrow URI) with a manifest; a rerun
skips finished stages and resumes a half-finished one. Each stage's config carries the config
hash of the stage it reads from (``input.fingerprint``), so changing one stage re-runs it and
all after it. Stages run strictly one after another, so generation and training never hold the
same GPUs.

- ``stages.py``: the config models and the stages they make, validated before anything runs;
- ``run.py``: running them, the embedded servers, the report;
- ``runlog.py``: ``run_dir/manifest.json``, every stage's attempts across invocations.
"""

from tuna_ray.pipeline.run import run_pipeline, stand_ins
from tuna_ray.pipeline.stages import (
    PipelineConfig,
    PipelineEvalConfig,
    ServerConfig,
    Stage,
    StageFailedError,
    plan,
)

__all__ = [
    "PipelineConfig",
    "PipelineEvalConfig",
    "ServerConfig",
    "Stage",
    "StageFailedError",
    "plan",
    "run_pipeline",
    "stand_ins",
]
