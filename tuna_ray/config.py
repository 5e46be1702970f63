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


def _merge(default: dict, given: dict) -> dict:
    """``given`` over ``default``, recursively for nested sections."""
    out = dict(default)
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class _Strict(BaseModel):
    """Config base: unknown keys are errors, and a section given in part keeps the defaults
    of the keys it leaves out -- including a field's own default section, such as the
    contextual phase's learning rate of 1e-6 (``train_c: {epochs: 1}`` must not reset it to
    the class default)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _partial_sections_keep_defaults(cls, data):
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, field in cls.model_fields.items():
            given, default = out.get(name), field.default
            if isinstance(given, dict) and isinstance(default, BaseModel):
                out[name] = _merge(default.model_dump(), given)
        return out


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
    # None: no clipping, as the reference (its DeepSpeed config has no gradient_clipping key).
    max_grad_norm: float | None = Field(default=None, gt=0)


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
    # "packed": each prompt computed once, answers packed without padding (train/packing.py);
    # "padded": B·N sequences padded to the longest (the formulation of the reference code's
    # data layout, kept to compare against).
    formulation: Literal["packed", "padded"] = "packed"
    pack_row_tokens: int = Field(default=1024, ge=1, description="target packed row length")
    # Output-head logits computed at once (chunks are recomputed in backward); None: 64 Mi.
    head_chunk_logits: int | None = Field(default=None, ge=1)
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
    # "async": Ray uploads each checkpoint in the background while training goes on.
    checkpoint_upload: Literal["async", "sync"] = "async"
    export: bool = True
    # Once the model is exported, the optimizer checkpoints (only needed to resume) are deleted.
    keep_checkpoints_after_export: bool = False
    # Testing hook: the worker of this rank exits hard at this step, on the first attempt only.
    fail_at_step: int | None = None
    fail_rank: int = 0


class ScalingConfig(_Strict):
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    # Ray's accelerator label (e.g. "A100", "H100"): every worker gets the same kind of GPU, so
    # a multi-node run never mixes node types (their memory and speed differ).
    accelerator_type: str | None = None
    cpus_per_worker: float = Field(default=1.0, gt=0)
    max_failures: int = Field(default=2, ge=0)
    # Tokenisation actors before training; None: as many as the cluster has CPUs (capped at 64).
    tokenize_actors: int | None = Field(default=None, ge=1)


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
    # A run in which more than this share of the records failed (after the engine's retries)
    # stops with TooManyFailuresError once its results are written; a rerun retries the failures.
    max_failure_share: float = Field(default=0.05, ge=0.0, le=1.0)


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
    """Probabilistic ranking: the teacher samples N answers, ranked by mean token log-prob.

    Every candidate of an instruction is scored in one context through one endpoint (score =
    mean raw log-prob of the answer's tokens, EOS excluded): ``scoring: sampled`` uses the
    log-probs returned with the samples; ``scoring: echo`` re-reads samples and reference after
    the prompt text (openai: ``/completions`` with ``echo``). ``auto``: echo exactly when
    ``include_reference`` (the reference can only be scored by re-reading it).
    """

    include_reference: bool = Field(
        default=False, description="re-score the dataset's own answer and rank it too"
    )
    scoring: Literal["auto", "sampled", "echo"] = "auto"
    # Empty or duplicate samples carry no signal: drop them, or ask for replacements first.
    on_bad_sample: Literal["drop", "resample"] = "resample"
    resample_rounds: int = Field(default=2, ge=0)
    min_candidates: int = Field(default=2, ge=2)
    retry_failed: bool = Field(default=False, description="rerun a finished stage's failures")

    @property
    def score_by_echo(self) -> bool:
        return self.scoring == "echo" or (self.scoring == "auto" and self.include_reference)

    @model_validator(mode="after")
    def _servable(self) -> ProbabilisticStageConfig:
        # Refuse, before any request is paid for, what the endpoint cannot serve.
        if self.include_reference and self.scoring == "sampled":
            raise ValueError(
                "include_reference: true needs scoring: echo (or auto): the reference answer "
                "can only be scored by re-reading it, so the samples must be scored the same "
                "way to be comparable"
            )
        if getattr(self.engine, "kind", None) != "openai":
            return self
        if self.score_by_echo and self.engine.endpoint != "completions":
            why = "include_reference: true" if self.include_reference else "scoring: echo"
            raise ValueError(
                f"{why} scores every candidate through /completions with echo, which "
                f"engine.endpoint: {self.engine.endpoint} does not serve; use "
                "engine.endpoint: completions with a teacher that serves completions + echo + "
                "logprobs (e.g. a vLLM OpenAI server), or set include_reference: false"
            )
        if self.template == "chat" and self.engine.endpoint == "completions":
            raise ValueError(
                "template: chat with engine.kind: openai needs engine.endpoint: chat (the "
                "server applies its chat template; engine.endpoint: completions needs the "
                "prompt as text: template: alpaca)"
            )
        return self


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
    # The reference code adds each instruction's original (dataset) answer to both training
    # sets: here it is shown to the judge with the samples and ranked with them.
    include_original: bool = Field(
        default=True, description="rank the dataset's own answer with the student's samples"
    )
    max_parse_retries: int = Field(default=2, ge=0, description="new samples after a bad reply")


def load_config(path: str | Path | None, overrides: list[str] | None = None, model=TrainJobConfig):
    """Load YAML ``path``, apply dotted ``key=value`` overrides, validate into ``model``."""
    from omegaconf import OmegaConf

    base = OmegaConf.load(path) if path else OmegaConf.create({})
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(
                f"override {item!r}: expected key=value, e.g. train_p.epochs=1 (a dotted key; "
                "list items by index: tasks.0.data.path=...)"
            )
        # The value is read as YAML (numbers, booleans, lists); the key may index lists.
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={value}"]))["value"]
        OmegaConf.update(base, key.strip(), parsed, merge=True)
    return model.model_validate(OmegaConf.to_container(base, resolve=True))


def config_hash(config: BaseModel | dict) -> str:
    """A stable short hash of a config (a model or its JSON dump), for manifests and caches."""
    dumped = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    blob = json.dumps(dumped, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
