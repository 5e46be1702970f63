"""Typed configuration of ``tuna-ray eval``: the model(s), the tasks, where results go.

Stage: eval. Strict like tuna_ray/config.py (unknown keys are errors). The smallest config::

    model: {name_or_path: builtin:smollm2-135m-instruct, template: chat}
    tasks:
      - {name: alpaca_eval_ranked, kind: ranking_agreement,
         data: {path: jobs/data/alpaca_eval_ranked_64.jsonl}}
    output_dir: ./runs/eval-ranking-agreement-cpu

Several models (``models: [...]`` instead of ``model:``) are evaluated one after another on the
same tasks, each under ``output_dir/<label>/``, and compared in ``output_dir/comparison.md``.

Generation settings: ``model.generation`` (greedy, one answer of at most 512 tokens by
default) applies to every task; a task's ``generation`` mapping overrides single fields.
The judge's ``sampling`` likewise overrides the judge template's defaults field by field.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from tuna_ray.config import DataConfig, ModelConfig, StageScalingConfig, _Strict
from tuna_ray.engines.base import SamplingParams
from tuna_ray.engines.factory import EngineConfig, JudgeEngineConfig

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # task names and model labels name folders


class GenerationParams(SamplingParams):
    """How the evaluated model answers: one answer per prompt, greedy by default."""

    n: int = Field(default=1, ge=1, le=1)
    temperature: float = Field(default=0.0, ge=0.0)
    max_tokens: int = Field(default=512, ge=1)
    seed: int | None = 0


class EvalModelConfig(ModelConfig):
    """A model to evaluate: ``name_or_path`` + ``template`` as in training configs, and how it
    generates. ``engine`` defaults to ``{kind: hf, model: name_or_path}`` (CPU); give
    ``{kind: hf, device: cuda, dtype: bfloat16}`` for GPU actors, or ``{kind: openai, ...}`` for
    a model behind an OpenAI-compatible server (``ranking_agreement`` always loads the weights
    from ``name_or_path`` with transformers)."""

    label: str | None = Field(default=None, pattern=NAME_PATTERN, description="name in tables")
    # Identifies the weights (the pipeline passes the training stage's hash); default: a hash
    # of the local folder's files (tuna_ray.eval.digests.model_fingerprint).
    fingerprint: str | None = None
    engine: EngineConfig | None = None
    generation: GenerationParams = GenerationParams()

    @model_validator(mode="before")
    @classmethod
    def _engine_model_defaults_to_the_model(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("engine"), dict):
            engine = {"kind": "hf", **data["engine"]}
            if engine["kind"] in ("hf", "vllm") and "model" not in engine:
                engine["model"] = data.get("name_or_path")
            data = {**data, "engine": engine}
        return data

    @property
    def display_label(self) -> str:
        """``label``, else the last part of the path (``builtin:`` dropped)."""
        if self.label:
            return self.label
        name = self.name_or_path.removeprefix("builtin:").rstrip("/")
        return PurePath(name).name or name


def _check_overrides(value: dict[str, Any] | None, base: type[SamplingParams], where: str):
    if value is not None:
        unknown = set(value) - set(base.model_fields)
        if unknown:
            raise ValueError(f"{where}: unknown sampling fields {sorted(unknown)}")
        base.model_validate(value)  # types and ranges
    return value


class _Task(_Strict):
    name: str = Field(pattern=NAME_PATTERN)


class RankingAgreementTask(_Task):
    """Share of ordered answer pairs whose mean token log-prob follows the given order."""

    kind: Literal["ranking_agreement"]
    data: DataConfig  # ranked records (tuna_ray.data.readers.read_ranked)
    max_length: int = Field(default=2048, ge=8, description="tokens per prompt + answer")


class RougeLData(_Strict):
    """Super-NaturalInstructions task files (natural-instructions ``tasks/<task>.json``)."""

    path: str  # the tasks/ folder, or one task file
    tasks: list[str] | None = None  # task names; default: every *.json in the folder
    tasks_file: str | None = None  # one name per line, e.g. builtin:super_ni/test_tasks.txt
    instances_per_task: int = Field(default=100, ge=1)

    @model_validator(mode="after")
    def _one_task_list(self) -> RougeLData:
        if self.tasks is not None and self.tasks_file is not None:
            raise ValueError("give tasks or tasks_file, not both")
        return self


class RougeLTask(_Task):
    """Super-NI zero-shot ROUGE-L and exact match (tuna_ray.eval.superni)."""

    kind: Literal["rouge_l"]
    data: RougeLData
    # "template": the Super-NI prompt is the instruction, in the model's template (instruction-
    # tuned models); "raw": the model continues the prompt text itself (base / Tk models).
    prompt_format: Literal["template", "raw"] = "template"
    generation: dict[str, Any] | None = None

    _generation = field_validator("generation")(
        lambda v: _check_overrides(v, GenerationParams, "generation")
    )


class PairwiseData(_Strict):
    """Questions with the reference answers the model is compared against.

    ``path``: ``builtin:vicuna_qa/<answers>`` (80 questions; answers of alpaca-13b, bard, gpt35,
    llama-13b, vicuna-13b, ...), ``builtin:alpaca_eval_sample/<generator>`` (100 AlpacaEval
    instructions; text_davinci_003 or gpt4_1106_preview), an AlpacaEval ``model_outputs.json``,
    FastChat question + answer files (``format: fastchat``, ``references``: the answers file),
    or instruction records with a ``reference`` (JSONL / JSON / Parquet, ``format: instructions``).
    """

    path: str
    format: Literal["auto", "alpaca_eval", "fastchat", "instructions"] = "auto"
    references: str | None = None
    reference_name: str | None = None  # who wrote the references (default: from the data)
    limit: int | None = Field(default=None, ge=1)


class JudgeConfig(_Strict):
    """An OpenAI-compatible judge (or a model on vLLM); each question is judged in both orders."""

    engine: JudgeEngineConfig
    template: Literal["fastchat_pair_v2", "alpaca_eval_gpt4", "tuna_contextual"] = (
        "fastchat_pair_v2"
    )
    sampling: dict[str, Any] | None = None  # overrides the template's defaults
    # "consistent" (FastChat): a win must hold in both orders, anything else is a tie;
    # "mean": the two orders' outcomes (win 1, tie 0.5, loss 0) are averaged.
    aggregate: Literal["consistent", "mean"] = "consistent"
    max_parse_retries: int = Field(default=2, ge=0)
    scaling: StageScalingConfig = StageScalingConfig(batch_size=16, cpus_per_actor=0.5)

    _sampling = field_validator("sampling")(
        lambda v: _check_overrides(v, SamplingParams, "judge.sampling")
    )


class PairwiseJudgeTask(_Task):
    """Win rate of the model's answers against reference answers, by an LLM judge."""

    kind: Literal["pairwise_judge"]
    data: PairwiseData
    judge: JudgeConfig
    generation: dict[str, Any] | None = None

    _generation = field_validator("generation")(
        lambda v: _check_overrides(v, GenerationParams, "generation")
    )


EvalTask = Annotated[
    RankingAgreementTask | RougeLTask | PairwiseJudgeTask, Field(discriminator="kind")
]


class BootstrapConfig(_Strict):
    """Percentile bootstrap over evaluation items (questions, instances, ranked records)."""

    resamples: int = Field(default=1000, ge=10)
    seed: int = 0
    level: float = Field(default=0.95, gt=0, lt=1)


class EvalConfig(_Strict):
    """Everything ``tuna-ray eval`` needs (see the module docstring)."""

    model: EvalModelConfig | None = None
    models: list[EvalModelConfig] | None = None
    tasks: list[EvalTask] = Field(min_length=1)
    output_dir: str = "./runs/eval"
    # Finished task results by digest (model fingerprint, task, data, judge), shared between
    # output dirs and runs: a model evaluated before costs nothing.
    cache_dir: str | None = None
    bootstrap: BootstrapConfig = BootstrapConfig()
    scaling: StageScalingConfig = StageScalingConfig()  # generation / scoring actors
    ray_address: str | None = None
    # A stage (generation, judging, scoring) in which more than this share of the items failed
    # stops with StageFailedError; its results are kept and a rerun retries only the failures.
    max_failure_share: float = Field(default=0.05, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _models_and_tasks(self) -> EvalConfig:
        if (self.model is None) == (self.models is None):
            raise ValueError("give exactly one of 'model' (one model) or 'models' (a list)")
        labels = [m.display_label for m in self.model_list()]
        if len(set(labels)) != len(labels):
            raise ValueError(f"model labels must differ, got {labels}; set models[i].label")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must differ, got {names}")
        return self

    def model_list(self) -> list[EvalModelConfig]:
        return [self.model] if self.model is not None else list(self.models or [])


def merged_sampling(base: SamplingParams, overrides: dict[str, Any] | None) -> SamplingParams:
    """``base`` with the fields of ``overrides`` replaced (validated as ``type(base)``)."""
    if not overrides:
        return base
    return type(base).model_validate({**base.model_dump(), **overrides})
