"""Typed configuration: one pydantic model per stage, composed into the pipeline config.

A YAML file plus dotted ``key=value`` overrides (``train.learning_rate=2e-5``) is merged with
OmegaConf and validated here; unknown keys are errors, so a typo never silently falls back to a
default. Defaults are the paper's (METHOD.md) unless a field says otherwise.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tuna_ray.engines.base import SamplingParams
from tuna_ray.engines.factory import EngineConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """The model to train: a hub id, a local folder, or ``builtin:<name>`` (see tuna_ray.models)."""

    name_or_path: str
    # "alpaca": the paper's prompt template; "chat": the tokenizer's chat template.
    template: Literal["alpaca", "chat"] = "alpaca"
    system_prompt: str | None = None
    trust_remote_code: bool = False


class DataConfig(_Strict):
    """Where ranked (or SFT) records come from; see tuna_ray.data.readers for the formats."""

    path: str
    format: Literal["auto", "json", "jsonl", "parquet", "hf", "reference"] = "auto"
    # "raise": stop at the first bad record (file, line, field named); "skip": count and go on.
    on_error: Literal["raise", "skip"] = "raise"
    limit: int | None = Field(default=None, ge=1, description="use only the first N records")
    # Identifies the content behind ``path`` (the pipeline sets it to the producing stage's
    # config hash), so that a changed upstream stage re-runs this one too.
    fingerprint: str | None = None


class OptimConfig(_Strict):
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 2
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = 1.0


class TrainConfig(_Strict):
    """The finetuning stage: Tuna loss (ranked candidates) or SFT (one answer, MLE only)."""

    mode: Literal["tuna", "sft"] = "tuna"
    epochs: int = Field(default=1, ge=1)
    max_steps: int | None = Field(default=None, ge=1, description="stop early (smoke runs)")
    # Instructions per worker per micro-step; every instruction brings its N candidates.
    micro_batch_size: int = Field(default=16, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    max_length: int = Field(default=512, ge=8)
    margin: float = Field(default=0.1, ge=0.0)
    mle_weight: float = Field(default=1.0, ge=0.0)
    mle_target: Literal["all", "best"] = "all"
    max_candidates: int | None = Field(default=None, ge=1, description="keep the best K")
    optim: OptimConfig = OptimConfig()
    zero_stage: Literal[0, 1, 2, 3] = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    # "auto": bf16 on GPUs that support it, else fp16 on GPU; fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = True
    seed: int = 42
    log_every: int = Field(default=1, ge=1)
    checkpoint_every: int = Field(default=200, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    export: bool = True
    # Testing hook: the worker of this rank exits hard at this step, on the first attempt only.
    fail_at_step: int | None = None
    fail_rank: int = 0


class ScalingConfig(_Strict):
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    max_failures: int = Field(default=2, ge=0)


class RunConfig(_Strict):
    """Where a run lives: ``storage_path/name`` (a local path or a pyarrow URI: s3://, gs://)."""

    name: str = "tuna-run"
    storage_path: str = "./runs"
    # Ray address; None starts (or joins, inside `ray job submit`) a local Ray.
    ray_address: str | None = None
    # A run dir holding a run of a different config: refuse ("error") or start over ("restart").
    on_config_change: Literal["error", "restart"] = "error"


class TrainJobConfig(_Strict):
    """Everything ``tuna-ray train`` needs."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _absolute_local_storage(self) -> TrainJobConfig:
        # Ray Train requires an absolute local storage path; resolve it against the cwd once.
        if "://" not in self.run.storage_path:
            self.run.storage_path = str(Path(self.run.storage_path).expanduser().resolve())
        return self


class StageScalingConfig(_Strict):
    """How a Ray Data generation stage spreads over the cluster."""

    actors: int = Field(default=1, ge=1, description="actor pool size (engine replicas)")
    batch_size: int = Field(default=8, ge=1, description="instructions per actor batch")
    cpus_per_actor: float = Field(default=1.0, ge=0)
    gpus_per_actor: float = Field(default=0.0, ge=0)
    ray_address: str | None = None


class EngineStageConfig(_Strict):
    """What every generation/ranking stage has: records in, a results folder, an engine."""

    input: DataConfig
    output_dir: str
    engine: EngineConfig
    scaling: StageScalingConfig = StageScalingConfig()


class SamplingStageBase(EngineStageConfig):
    """Stages that sample N answers per instruction (teacher or student)."""

    # Reference defaults (METHOD.md, student sampling): temperature 1.0, top_p 1.0, 512 tokens.
    sampling: SamplingParams = SamplingParams(
        n=4, temperature=1.0, top_p=1.0, max_tokens=512, seed=0
    )
    # "alpaca": the paper's prompt as text (chat endpoints get it as the user message);
    # "chat": the instruction (+ input) as the user message, rendered by the model's template.
    template: Literal["alpaca", "chat"] = "alpaca"
    system_prompt: str | None = None


class ProbabilisticStageConfig(SamplingStageBase):
    """Probabilistic ranking: the teacher samples N answers, ranked by mean token log-prob."""

    include_reference: bool = Field(
        default=False, description="re-score the dataset's own answer and rank it too"
    )
    # Empty or duplicate samples carry no signal: drop them, or ask for replacements first.
    on_bad_sample: Literal["drop", "resample"] = "resample"
    resample_rounds: int = Field(default=2, ge=0)
    min_candidates: int = Field(default=2, ge=2)
    retry_failed: bool = Field(default=False, description="rerun a finished stage's failures")


class SamplingStageConfig(SamplingStageBase):
    """Student sampling: N answers per instruction under the ROUGE-L diversity rule."""

    diversity_threshold: float = Field(default=0.8, gt=0, le=1)
    max_trials: int = Field(default=3, ge=1)
    temperature_step: float = Field(default=0.1, ge=0)


class ContextualStageConfig(EngineStageConfig):
    """Contextual ranking: a judge LLM ranks each instruction's N candidates in one prompt.

    ``input``: candidates, e.g. the sampling stage's candidates.parquet; ``engine``: an
    OpenAI-compatible judge (kind: openai).
    """

    judge_template: Literal["paper_v1", "json_v1"] = "paper_v1"
    # Reference judge call (METHOD.md): temperature 1.0, top_p 1.0, max_tokens 2048.
    judge_sampling: SamplingParams = SamplingParams(
        n=1, temperature=1.0, top_p=1.0, max_tokens=2048, seed=0
    )
    shuffle: bool = Field(default=False, description="shuffle the order shown (seeded)")
    shuffle_seed: int = 0
    folds: int = Field(default=1, ge=1, description="judge k orders, aggregate by Borda")
    include_judge_reference: bool = Field(
        default=True, description="the judge's own answer joins the ranked candidates"
    )
    max_parse_retries: int = Field(default=2, ge=0, description="new samples after a bad reply")


def load_config(path: str | Path | None, overrides: list[str] | None = None, model=TrainJobConfig):
    """Load YAML ``path``, apply dotted ``key=value`` overrides, validate into ``model``."""
    from omegaconf import OmegaConf

    base = OmegaConf.load(path) if path else OmegaConf.create({})
    merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides or [])))
    return model.model_validate(OmegaConf.to_container(merged, resolve=True))


def config_hash(config: BaseModel | dict) -> str:
    """A stable short hash of a config (a model or its JSON dump), for manifests and caches."""
    dumped = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    blob = json.dumps(dumped, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
