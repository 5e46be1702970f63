"""The Tuna schedule planned: the pipeline config and the stages it makes, validated up front.

Stage: pipeline. ``plan(cfg)`` turns one ``PipelineConfig`` into the list of stage configs (a
typo fails before any GPU hour is spent): each stage reads the output of the one before, and its
input carries that stage's config hash (``input.fingerprint``), so a changed stage re-runs
everything after it. Engines whose ``base_url`` is ``embedded:<name>`` talk to a local
``tuna-ray serve`` (``servers.<name>``) that run.py starts for the stages that need it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from tuna_ray import storage
from tuna_ray.config import (
    ContextualStageConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    ProbabilisticStageConfig,
    RunConfig,
    SamplingStageConfig,
    ScalingConfig,
    TrainConfig,
    TrainJobConfig,
    _Strict,
)

log = logging.getLogger(__name__)


class StageFailedError(RuntimeError):
    """The pipeline stopped at a stage; the message names the stage and the reason."""


class ServerConfig(_Strict):
    """An embedded OpenAI-compatible server (``tuna-ray serve``) on 127.0.0.1."""

    mode: Literal["model", "judge", "fixed"] = "model"
    model: str | None = Field(default=None, description="None in model mode: the student")
    judge_rule: Literal["length", "reverse_length", "index"] = "length"
    startup_timeout_s: float = 300.0


EvalModel = Literal["start", "tuna_p", "tuna_c", "tuna"]


class PipelineEvalConfig(_Strict):
    """The evaluation that ends a run (tuna_ray.eval): the start model and every model the
    variant trains, on the same ``tasks`` (``tuna-ray eval``'s task list), compared in one table
    at the top of report.md. Each (model, task) result is cached: a rerun pays nothing."""

    tasks: list[dict[str, Any]] = Field(min_length=1)
    # Which models; None: "start" and what the variant trains (tuna_p and/or tuna_c / tuna).
    models: list[EvalModel] | None = None
    generation: dict[str, Any] = Field(default_factory=dict)  # the models' answers
    engine: dict[str, Any] | None = None  # how the models answer; default: hf on CPU
    bootstrap: dict[str, Any] = Field(default_factory=dict)
    scaling: dict[str, Any] = Field(default_factory=dict)
    max_failure_share: float = Field(default=0.05, ge=0.0, le=1.0)


class PipelineConfig(_Strict):
    variant: Literal["tuna", "tuna_p", "tuna_c"] = "tuna"
    run_dir: str = "./runs/tuna"
    student: ModelConfig  # the instruction-tuned (or SFT) model Tuna starts from
    instructions: DataConfig
    servers: dict[str, ServerConfig] = Field(default_factory=dict)
    sft: TrainConfig | None = None  # optional: SFT on the instructions' reference answers first
    # Stage sections: a stage config without input/output_dir (the pipeline fills them in).
    probabilistic: dict[str, Any] = Field(default_factory=dict)
    train_p: TrainConfig = TrainConfig()
    sampling: dict[str, Any] = Field(default_factory=dict)
    contextual: dict[str, Any] = Field(default_factory=dict)
    train_c: TrainConfig = TrainConfig(optim=OptimConfig(learning_rate=1e-6))
    scaling: ScalingConfig = ScalingConfig()  # training workers
    eval: PipelineEvalConfig | None = None  # the evaluation that ends the run
    ray_address: str | None = None


@dataclass
class Stage:
    name: str
    kind: str  # "train" | "rank_probabilistic" | "sample" | "rank_contextual"
    config: Any
    digest: str
    servers: list[str] = field(default_factory=list)

    @property
    def output_dir(self) -> str:
        if self.kind == "train":
            return storage.join(self.config.run.storage_path, self.config.run.name)
        return self.config.output_dir


def _eval_config(cfg: PipelineConfig, run_dir: str, trained: dict):
    """The EvalConfig of the run's evaluation: one model per label, fingerprinted by the
    digest of the stage that made it (the start model: by its own files)."""
    from tuna_ray.eval import EvalConfig

    section = cfg.eval
    labels = section.models or list(trained)
    missing = [m for m in labels if m not in trained]
    if missing:
        raise ValueError(
            f"eval.models: {missing} not made by variant {cfg.variant} (it makes {list(trained)})"
        )
    models = []
    for label in labels:
        path, fingerprint = trained[label]
        model = {
            **cfg.student.model_dump(),
            "name_or_path": path,
            "label": label,
            "fingerprint": fingerprint,
            "generation": section.generation,
        }
        if section.engine is not None:
            model["engine"] = {**section.engine, "model": path}
        models.append(model)
    return EvalConfig.model_validate(
        {
            "models": models,
            "tasks": section.tasks,
            "output_dir": storage.join(run_dir, "eval"),
            "cache_dir": storage.join(run_dir, "eval", "cache"),
            "bootstrap": section.bootstrap,
            "scaling": {"ray_address": cfg.ray_address, **section.scaling},
            "ray_address": cfg.ray_address,
            "max_failure_share": section.max_failure_share,
        }
    )


_EVAL_OPERATIONAL = {"scaling": True, "ray_address": True, "max_failure_share": True}


def _digest(kind: str, cfg) -> str:
    if kind == "eval":
        from tuna_ray.config import config_hash

        return config_hash(cfg.model_dump(mode="json", exclude=_EVAL_OPERATIONAL))
    if kind == "train":
        from tuna_ray.train.trainer import result_hash

        return result_hash(cfg)
    from tuna_ray.ranking.runner import stage_digest

    return stage_digest(cfg)


def plan(cfg: PipelineConfig) -> list[Stage]:
    """All stage configs, validated up front (a typo fails before any GPU hour is spent)."""
    run_dir = cfg.run_dir if "://" in cfg.run_dir else str(storage.filesystem(cfg.run_dir)[1])
    stages: list[Stage] = []

    def add(name: str, kind: str, config) -> Stage:
        if kind == "eval":
            from tuna_ray.eval import embedded_servers

            servers = sorted(embedded_servers(config))
        else:
            url = getattr(getattr(config, "engine", None), "base_url", "") or ""
            servers = [url.removeprefix("embedded:")] if url.startswith("embedded:") else []
        for s in servers:
            if s not in cfg.servers:
                raise ValueError(f"{name}.engine.base_url={url}: no servers.{s} in the config")
        stage = Stage(name, kind, config, _digest(kind, config), servers)
        stages.append(stage)
        return stage

    def train(name: str, model: str, data: DataConfig, tc: TrainConfig) -> Stage:
        job = TrainJobConfig(
            model=ModelConfig(**{**cfg.student.model_dump(), "name_or_path": model}),
            data=data,
            train=tc,
            scaling=cfg.scaling,
            run=RunConfig(
                name=name,
                storage_path=run_dir,
                ray_address=cfg.ray_address,
                on_config_change="restart",
            ),
        )
        return add(name, "train", job)

    def stage_cfg(model, section: dict, name: str, data: DataConfig, **fill):
        scaling = {"ray_address": cfg.ray_address, **section.get("scaling", {})}
        engine = {**fill.pop("engine", section.get("engine", {}))}
        if engine.get("kind") == "openai" and engine.get("cache_dir") is None:
            # With the run, not on the node: a rerun after node loss or a job retry still pays
            # nothing twice (cache_dir is operational: the stage hash does not change).
            from tuna_ray.ranking.runner import CACHE_DIR

            engine["cache_dir"] = storage.join(run_dir, name, CACHE_DIR)
        return model.model_validate(
            {
                **section,
                **fill,
                **({"engine": engine} if engine else {}),
                "input": data.model_dump(),
                "output_dir": storage.join(run_dir, name),
                "scaling": scaling,
            }
        )

    model = cfg.student.name_or_path
    if cfg.sft is not None:
        sft = train("sft", model, cfg.instructions, cfg.sft.model_copy(update={"mode": "sft"}))
        model = storage.join(sft.output_dir, "hf_model")
    start_model, start_digest = model, stages[-1].digest if stages else None
    trained = {"start": (start_model, start_digest)}  # eval label -> (model, fingerprint)
    if cfg.variant in ("tuna", "tuna_p"):
        rank_p = add(
            "rank_probabilistic",
            "rank_probabilistic",
            stage_cfg(
                ProbabilisticStageConfig,
                cfg.probabilistic,
                "rank_probabilistic",
                cfg.instructions.model_copy(update={"fingerprint": start_digest}),
            ),
        )
        tuna_p = train(
            "train_p",
            start_model,
            DataConfig(
                path=storage.join(rank_p.output_dir, "ranked.parquet"), fingerprint=rank_p.digest
            ),
            cfg.train_p,
        )
        start_model, start_digest = storage.join(tuna_p.output_dir, "hf_model"), tuna_p.digest
        trained["tuna_p"] = (start_model, start_digest)
    if cfg.variant in ("tuna", "tuna_c"):
        section = cfg.sampling
        engine = {"kind": "hf", **section.get("engine", {})}
        if engine["kind"] in ("hf", "vllm"):
            engine["model"] = start_model  # sample from the model the previous stage made
        sample = add(
            "sample",
            "sample",
            stage_cfg(
                SamplingStageConfig,
                {**section, "engine": engine},
                "sample",
                cfg.instructions.model_copy(update={"fingerprint": start_digest}),
                template=section.get("template", cfg.student.template),
            ),
        )
        rank_c = add(
            "rank_contextual",
            "rank_contextual",
            stage_cfg(
                ContextualStageConfig,
                cfg.contextual,
                "rank_contextual",
                DataConfig(
                    path=storage.join(sample.output_dir, "candidates.parquet"),
                    fingerprint=sample.digest,
                ),
            ),
        )
        tuna_c = train(
            "train_c",
            start_model,
            DataConfig(
                path=storage.join(rank_c.output_dir, "ranked.parquet"), fingerprint=rank_c.digest
            ),
            cfg.train_c,
        )
        label = "tuna" if cfg.variant == "tuna" else "tuna_c"
        trained[label] = (storage.join(tuna_c.output_dir, "hf_model"), tuna_c.digest)
    if cfg.eval is not None:
        eval_cfg = _eval_config(cfg, run_dir, trained)
        add("eval", "eval", eval_cfg)
    return stages
