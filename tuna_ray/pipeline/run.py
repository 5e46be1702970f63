"""Running the planned stages one after another, with the run's record and report.

Stage: pipeline. ``run_pipeline`` skips finished stages, resumes a half-finished one, starts the
embedded servers a stage needs (and stops them after), keeps ``run_dir/manifest.json``
(runlog.py) and writes ``run_dir/report.md`` (tuna_ray.report), also after a failure or Ctrl-C.
"""

from __future__ import annotations

import logging
import time

from tuna_ray import storage
from tuna_ray.lease import LeaseHeldError, LeaseLostError
from tuna_ray.pipeline.stages import PipelineConfig, Stage, StageFailedError, plan
from tuna_ray.ranking.runner import TooManyFailuresError
from tuna_ray.storage import StorageError

log = logging.getLogger(__name__)


EVAL_STAMP = "pipeline_digest.txt"  # in run_dir/eval: the digest of the evaluation that finished


def _finished(stage: Stage) -> bool:
    if stage.kind == "train":
        stamp = storage.join(stage.output_dir, "train_config_hash.txt")
        report = storage.join(stage.output_dir, "train_report.json")
        return (
            storage.exists(report)
            and storage.exists(stamp)
            and storage.read_text(stamp).strip() == stage.digest
        )
    if stage.kind == "eval":
        stamp = storage.join(stage.output_dir, EVAL_STAMP)
        return storage.exists(stamp) and storage.read_text(stamp).strip() == stage.digest
    from tuna_ray.data.parts import read_manifest

    manifest = read_manifest(stage.output_dir)
    return manifest is not None and manifest.get("config_hash") == stage.digest


def _run_stage(stage: Stage, endpoints: dict[str, str]) -> dict:
    if stage.kind == "train":
        from tuna_ray.train.trainer import run_training

        return run_training(stage.config).report  # holds the run dir's lease itself
    if stage.kind == "eval":
        from tuna_ray.eval import run_eval

        results = run_eval(stage.config, endpoints)
        storage.write_text(storage.join(stage.output_dir, EVAL_STAMP), stage.digest + "\n")
        return results
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
    """Run every stage in order; keep ``run_dir/manifest.json`` (tuna_ray.pipeline.runlog) and write
    ``run_dir/report.md``; return a summary. Ctrl-C stops the stage in flight: what it wrote
    is kept, the record says "interrupted", and the same command resumes."""
    from contextlib import ExitStack

    from tuna_ray.pipeline.runlog import RunLog
    from tuna_ray.ray_setup import ensure_ray

    stages = plan(cfg)
    storage.check_writable(cfg.run_dir)  # before any stage, server or Ray starts
    runlog = RunLog(cfg.run_dir, cfg.variant, stages)
    started = time.time()
    log.info("pipeline %s: %s", cfg.variant, " -> ".join(s.name for s in stages))
    status = "failed"
    try:
        for i, stage in enumerate(stages, 1):
            if _finished(stage):
                log.info("[%d/%d] %s: finished before, skipped", i, len(stages), stage.name)
                runlog.skipped(stage.name)
                continue
            log.info(
                "[%d/%d] %s: starting (elapsed %.0f s)",
                i,
                len(stages),
                stage.name,
                time.time() - started,
            )
            runlog.started(stage.name)
            # room for the training workers (and, beside them, Ray Data tasks: ensure_ray)
            ensure_ray(
                cfg.ray_address,
                min_cpus=cfg.scaling.num_workers * cfg.scaling.cpus_per_worker,
                trains=any(s.kind == "train" for s in stages[i - 1 :]),
            )
            try:
                with ExitStack() as stack:
                    endpoints = _start_servers(cfg, stage.servers, stack)
                    _run_stage(stage, endpoints)
            except KeyboardInterrupt:
                runlog.ended(stage.name, "interrupted", "interrupted (Ctrl-C)")
                status = "interrupted"
                raise
            except BaseException as exc:
                runlog.ended(stage.name, "failed", f"{type(exc).__name__}: {exc}")
                log.error("[%d/%d] %s failed, the pipeline stops here", i, len(stages), stage.name)
                if isinstance(exc, _NAMED_ERRORS):
                    raise StageFailedError(
                        f"stopped at stage {stage.name} ({i}/{len(stages)}): {exc}"
                    ) from exc
                raise
            runlog.ended(stage.name, "ran")
            log.info(
                "[%d/%d] %s: done in %.0f s",
                i,
                len(stages),
                stage.name,
                runlog.stage(stage.name)["attempts"][-1]["wall_time_s"],
            )
        status = "finished"
    finally:
        runlog.finish(status)
        report_path = _write_report(cfg, stages, runlog)
    final = next((s for s in reversed(stages) if s.kind == "train"), stages[-1])
    return {
        "run_dir": cfg.run_dir,
        "report": report_path,
        "model_dir": storage.join(final.output_dir, "hf_model") if final.kind == "train" else None,
        "stages": {name: e["status"] for name, e in runlog.data["stages"].items()},
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
    name = {"train": "train_report.json", "eval": "results.json"}.get(stage.kind, "manifest.json")
    path = storage.join(stage.output_dir, name)
    return storage.read_json(path) if storage.exists(path) else None


def _write_report(cfg: PipelineConfig, stages: list[Stage], runlog) -> str | None:
    try:
        from tuna_ray.report import write_run_report

        entries = runlog.report_entries({s.name: _read_report(s) for s in stages})
        return write_run_report(cfg.run_dir, entries, notes=stand_ins(cfg))
    except Exception:  # the report must never hide the stage's own error
        log.exception("could not write the run report")
        return None


def stand_ins(cfg: PipelineConfig) -> list[str]:
    """What stood in for what in this run (the report says it before any number)."""
    notes = []
    for name, server in cfg.servers.items():
        if server.mode == "judge":
            notes.append(
                f"The judge `embedded:{name}` is a scripted stand-in: it ranks answers by "
                f"`{server.judge_rule}`, in the paper's reply format, without reading them. "
                "Its rankings exercise the method, not its quality; point `contextual.engine` "
                "at a strong model (OpenAI, or a self-hosted judge on vLLM) for real runs."
            )
        elif server.mode == "model" and (server.model or cfg.student.name_or_path) == (
            cfg.student.name_or_path
        ):
            notes.append(
                f"The teacher `embedded:{name}` is the student itself "
                f"(`{cfg.student.name_or_path}`): probabilistic ranking then sharpens the "
                "student's own preferences. The paper's teacher is a much stronger model."
            )
    judge = cfg.contextual.get("engine", {})
    if judge.get("kind") == "vllm" and judge.get("model") == cfg.student.name_or_path:
        notes.append(
            f"The judge is the student model itself (`{judge['model']}`) on vLLM with "
            "structured output: every reply parses, but a model this small ranks weakly. "
            "Point `contextual.engine` at a strong model for real runs."
        )
    return notes
