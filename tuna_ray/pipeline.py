"""The Tuna schedule: one config, stages run one after another, each resumable.

    tuna-ray run --config jobs/configs/demo-cpu.yaml
    ray job submit --working-dir . -- python jobs/tuna.py --config jobs/configs/llama-7b-8gpu.yaml

Variants (METHOD.md): ``tuna_p`` = probabilistic ranking -> train Tuna_p; ``tuna_c`` = student
sampling from the start model -> contextual ranking -> train; ``tuna`` = both, the second
starting from Tuna_p. An optional SFT stage comes first. Every stage writes under
``run_dir/<stage>/`` (a local path or a pyarrow URI) with a manifest; a rerun skips finished
stages and resumes a half-finished one. Each stage's config carries the config hash of the
stage it reads from (``input.fingerprint``), so changing one stage re-runs it and all after it.
Stages run strictly one after another, so generation and training never hold the same GPUs.

Engines whose ``base_url`` is ``embedded:<name>`` talk to a local ``tuna-ray serve`` that the
pipeline starts for the stages that need it (``servers.<name>``) and stops afterwards.

Run storage: ``run_dir`` must be writable before anything starts; each stage holds the lease
of its output folder while it runs (tuna_ray.lease: one writer per stage output); the response
cache of an ``openai`` engine defaults to ``run_dir/<stage>/cache/`` so it lives as long as
the run does (``engine.cache_dir`` overrides it). A stage that fails stops the pipeline with
``StageFailedError`` naming the stage.
"""

from __future__ import annotations

import logging
import time
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
from tuna_ray.lease import LeaseHeldError, LeaseLostError
from tuna_ray.ranking.runner import TooManyFailuresError
from tuna_ray.storage import StorageError

log = logging.getLogger(__name__)


class StageFailedError(RuntimeError):
    """The pipeline stopped at a stage; the message names the stage and the reason."""


class ServerConfig(_Strict):
    """An embedded OpenAI-compatible server (``tuna-ray serve``) on 127.0.0.1."""

    mode: Literal["model", "judge", "fixed"] = "model"
    model: str | None = Field(default=None, description="None in model mode: the student")
    judge_rule: Literal["length", "reverse_length", "index"] = "length"
    startup_timeout_s: float = 300.0


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


def _digest(kind: str, cfg) -> str:
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
        train(
            "train_c",
            start_model,
            DataConfig(
                path=storage.join(rank_c.output_dir, "ranked.parquet"), fingerprint=rank_c.digest
            ),
            cfg.train_c,
        )
    return stages


def _finished(stage: Stage) -> bool:
    if stage.kind == "train":
        stamp = storage.join(stage.output_dir, "train_config_hash.txt")
        report = storage.join(stage.output_dir, "train_report.json")
        return (
            storage.exists(report)
            and storage.exists(stamp)
            and storage.read_text(stamp).strip() == stage.digest
        )
    from tuna_ray.data.parts import read_manifest

    manifest = read_manifest(stage.output_dir)
    return manifest is not None and manifest.get("config_hash") == stage.digest


def _run_stage(stage: Stage, endpoints: dict[str, str]) -> dict:
    if stage.kind == "train":
        from tuna_ray.train.trainer import run_training

        return run_training(stage.config).report  # holds the run dir's lease itself
    if stage.kind == "rank_probabilistic":
        from tuna_ray.ranking.probabilistic_stage import run_probabilistic

        return run_probabilistic(stage.config, endpoints)
    if stage.kind == "sample":
        from tuna_ray.ranking.sampling_stage import run_sampling

        return run_sampling(stage.config, endpoints)
    from tuna_ray.ranking.contextual_stage import run_contextual

    return run_contextual(stage.config, endpoints)


def _start_servers(cfg: PipelineConfig, names: list[str], stack) -> dict[str, str]:
    from tuna_ray.models import resolve_model
    from tuna_ray.serve.local import start_local_server

    urls = {}
    for name in names:
        sc = cfg.servers[name]
        model = None
        if sc.mode == "model":
            model = resolve_model(sc.model or cfg.student.name_or_path)
        log.info("starting embedded server %r (%s)", name, sc.mode)
        server = stack.enter_context(
            start_local_server(
                model,
                mode=sc.mode,
                judge_rule=sc.judge_rule,
                served_model_name=name,
                timeout=sc.startup_timeout_s,
            )
        )
        urls[name] = server.base_url
    return urls


def run_pipeline(cfg: PipelineConfig) -> dict:
    """Run every stage in order; write ``run_dir/report.md``; return a summary."""
    from contextlib import ExitStack

    from tuna_ray.ray_setup import ensure_ray

    stages = plan(cfg)
    storage.check_writable(cfg.run_dir)  # before any stage, server or Ray starts
    started = time.time()
    results: list[dict] = []
    log.info("pipeline %s: %s", cfg.variant, " -> ".join(s.name for s in stages))
    try:
        for i, stage in enumerate(stages, 1):
            entry = {
                "name": stage.name,
                "kind": stage.kind,
                "output_dir": stage.output_dir,
                "status": "skipped",
                "report": None,
                "wall_time_s": None,
                "error": None,
            }
            results.append(entry)
            if _finished(stage):
                log.info("[%d/%d] %s: finished before, skipped", i, len(stages), stage.name)
                entry["report"] = _read_report(stage)
                continue
            log.info(
                "[%d/%d] %s: starting (elapsed %.0f s)",
                i,
                len(stages),
                stage.name,
                time.time() - started,
            )
            t0 = time.time()
            # room for the training workers (and, beside them, Ray Data tasks: ensure_ray)
            ensure_ray(
                cfg.ray_address, min_cpus=cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
            )
            try:
                with ExitStack() as stack:
                    endpoints = _start_servers(cfg, stage.servers, stack)
                    entry["report"] = _run_stage(stage, endpoints)
            except BaseException as exc:
                entry.update(status="failed", error=f"{type(exc).__name__}: {exc}")
                if getattr(exc, "manifest", None) is not None:  # a stage over its failure bound
                    entry["report"] = exc.manifest
                log.error("[%d/%d] %s failed, the pipeline stops here", i, len(stages), stage.name)
                if isinstance(exc, _NAMED_ERRORS):
                    raise StageFailedError(
                        f"stopped at stage {stage.name} ({i}/{len(stages)}): {exc}"
                    ) from exc
                raise
            entry.update(status="ran", wall_time_s=round(time.time() - t0, 1))
            log.info("[%d/%d] %s: done in %.0f s", i, len(stages), stage.name, entry["wall_time_s"])
    finally:
        report_path = _write_report(cfg, results)
    final = stages[-1]
    return {
        "run_dir": cfg.run_dir,
        "report": report_path,
        "model_dir": storage.join(final.output_dir, "hf_model") if final.kind == "train" else None,
        "stages": {r["name"]: r["status"] for r in results},
        "wall_time_s": round(time.time() - started, 1),
    }


# Errors whose message already says what is wrong (config, data, storage, another run): the
# pipeline reports them in one line with the stage's name. Anything else keeps its traceback.
_NAMED_ERRORS = (
    ValueError,
    FileNotFoundError,
    StorageError,
    LeaseHeldError,
    LeaseLostError,
    TooManyFailuresError,
)


def _read_report(stage: Stage) -> dict | None:
    name = "train_report.json" if stage.kind == "train" else "manifest.json"
    path = storage.join(stage.output_dir, name)
    return storage.read_json(path) if storage.exists(path) else None


def _write_report(cfg: PipelineConfig, results: list[dict]) -> str | None:
    try:
        from tuna_ray.report import write_run_report

        return write_run_report(cfg.run_dir, results)
    except Exception:  # the report must never hide the stage's own error
        log.exception("could not write the run report")
        return None
