"""Driver side of the training stage: read records, tokenise in Ray Data, run TorchTrainer.

``run_training(config)`` is what ``tuna-ray train`` and ``jobs/train.py`` call. It writes, under
the run directory ``storage_path/name``:

    checkpoint_step*/    sharded DeepSpeed checkpoints (Ray Train keeps the newest K)
    consumed/            ids consumed per step, one file per rank and checkpoint interval
    metrics/             per-step metrics (JSON lines)
    hf_model/            the exported Hugging Face model (safetensors + tokenizer)
    train_report.json    counts (read, skipped, truncated, excluded), steps, final metrics, time
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from tuna_ray import storage, tracking
from tuna_ray.config import TrainJobConfig, config_hash

log = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    run_dir: str
    model_dir: str | None
    report: dict[str, Any]


def plan_steps(
    num_samples: int, *, micro_batch: int, grad_accum: int, world: int, max_steps: int | None
) -> tuple[int, int]:
    """``(total_steps, dropped_tail)``: full global batches only; the incomplete tail is dropped."""
    global_batch = micro_batch * grad_accum * world
    steps = num_samples // global_batch
    if max_steps is not None:
        steps = min(steps, max_steps)
    return steps, num_samples - (num_samples // global_batch) * global_batch


# Fields that change how a run is operated, not what it computes: a rerun may change them.
_OPERATIONAL = {
    "train": {
        "fail_at_step",
        "fail_rank",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "checkpoint_upload",
        "head_chunk_logits",
        "keep_checkpoints_after_export",
    },
    "scaling": {"max_failures", "cpus_per_worker", "tokenize_actors", "accelerator_type"},
    "run": True,
}


def result_hash(cfg: TrainJobConfig) -> str:
    """Hash of everything that determines the trained weights (see ``_OPERATIONAL``)."""
    return config_hash(cfg.model_dump(mode="json", exclude=_OPERATIONAL))


def _check_run_dir(run_dir: str, digest: str, on_change: str) -> dict | None:
    """The finished report if this exact run already finished; a different config is refused
    (``on_change="error"``) or its run directory is removed (``"restart"``)."""
    stamp = storage.join(run_dir, "train_config_hash.txt")
    if not storage.exists(stamp):
        return None
    previous = storage.read_text(stamp).strip()
    if previous != digest and on_change == "restart":
        log.warning("%s: training config changed, starting this run over", run_dir)
        from tuna_ray import lease

        lease.clear_dir(run_dir)  # everything but the lease this run holds
        return None
    if previous != digest:
        raise ValueError(
            f"{run_dir} holds a run with a different training config (hash {previous}, now "
            f"{digest}); its checkpoints would not fit. Use another run.name or delete it."
        )
    report = storage.join(run_dir, "train_report.json")
    return storage.read_json(report) if storage.exists(report) else None


def run_training(cfg: TrainJobConfig) -> TrainOutcome:
    """Train (or resume, or skip when finished) the run ``storage_path/name``.

    The run directory must be writable before any work, and one run at a time may hold it (a
    lease, tuna_ray.lease; it nests with the pipeline's own lease on the same folder)."""
    from tuna_ray import lease

    run_dir = storage.join(cfg.run.storage_path, cfg.run.name)
    storage.check_writable(run_dir)  # before any work
    with lease.hold_lease(run_dir, what=f"train {cfg.run.name}"):
        return _run_training(cfg, run_dir)


def _run_training(cfg: TrainJobConfig, run_dir: str) -> TrainOutcome:
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from tuna_ray import lease
    from tuna_ray.data.readers import read_ranked, require_records
    from tuna_ray.ray_setup import check_resources, ensure_ray
    from tuna_ray.train.dataset import build_training_dataset, split_by_rank
    from tuna_ray.train.loop import train_loop_per_worker

    started = time.time()
    tc, sc = cfg.train, cfg.scaling
    min_candidates = 1 if tc.mode == "sft" else 2

    digest = result_hash(cfg)
    finished = _check_run_dir(run_dir, digest, cfg.run.on_config_change)
    if finished is not None:
        log.info("%s already finished with this config: skipping (delete it to retrain)", run_dir)
        return TrainOutcome(run_dir=run_dir, model_dir=finished["model_dir"], report=finished)

    read = read_ranked(
        cfg.data.path, on_error=cfg.data.on_error, fmt=cfg.data.format, min_responses=min_candidates
    )
    records = read.records[: cfg.data.limit]
    require_records(records, read, cfg.data.path, stage="train")
    if tc.mode == "sft":  # SFT trains on the best (or only) answer of each record
        records = [{**r, "responses": r["responses"][:1]} for r in records]
    log.info("read %d records from %s (skipped: %s)", len(records), cfg.data.path, read.skipped)

    ensure_ray(cfg.run.ray_address, min_cpus=sc.num_workers * sc.cpus_per_worker, trains=True)
    check_resources(
        cpus=sc.num_workers * sc.cpus_per_worker,
        gpus=sc.num_workers if sc.use_gpu else 0,
        what="training",
    )
    dataset, stats = build_training_dataset(
        records,
        model_path=cfg.model.name_or_path,
        template=cfg.model.template,
        system_prompt=cfg.model.system_prompt,
        max_length=tc.max_length,
        epochs=tc.epochs,
        seed=tc.seed,
        min_candidates=min_candidates,
        max_candidates=tc.max_candidates,
        num_tokenize_actors=sc.tokenize_actors,
    )
    kept = stats.samples - stats.excluded_too_few_candidates
    total_steps, dropped_tail = plan_steps(
        kept,
        micro_batch=tc.micro_batch_size,
        grad_accum=tc.gradient_accumulation_steps,
        world=sc.num_workers,
        max_steps=tc.max_steps,
    )
    if total_steps == 0:
        raise ValueError(
            f"{kept} usable samples do not fill one global batch of "
            f"{tc.micro_batch_size * tc.gradient_accumulation_steps * sc.num_workers} "
            f"(micro_batch_size x gradient_accumulation_steps x num_workers); lower them"
        )

    global_batch = tc.micro_batch_size * tc.gradient_accumulation_steps * sc.num_workers
    datasets = split_by_rank(
        dataset, world=sc.num_workers, global_batch=global_batch, total_steps=total_steps
    )
    storage.write_text(storage.join(run_dir, "train_config_hash.txt"), digest + "\n")
    # Each rank reads its samples in global order (loop.py). Built directly: Ray's
    # default_ingest_options() copies deprecated fields and warns on every run.
    ingest = ray.data.ExecutionOptions(preserve_order=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": cfg.model_dump(mode="json"),
            "total_steps": total_steps,
            "run_dir": run_dir,
            "max_candidates": max(stats.max_candidates, 1),
            "samples_per_epoch": max(kept // tc.epochs, 1),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=sc.num_workers,
            use_gpu=sc.use_gpu,
            accelerator_type=sc.accelerator_type if sc.use_gpu else None,
            resources_per_worker={"CPU": sc.cpus_per_worker, **({"GPU": 1} if sc.use_gpu else {})},
        ),
        torch_config=TorchConfig(backend="nccl" if sc.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=cfg.run.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=sc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=tc.keep_checkpoints),
        ),
        # One dataset per rank ("rank<r>"), read whole by that rank only (see loop.py).
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=[], execution_options=ingest),
    )
    result = fit_leaving_ctrl_c_to_us(trainer)
    tracking.write_training(run_dir)  # the step metrics as TensorBoard scalars
    model_dir = storage.join(run_dir, "hf_model") if tc.export else None
    export_stats = storage.join(run_dir, "export_stats.json")
    report = {
        "stage": "train",
        "mode": tc.mode,
        "config_hash": digest,
        "data": {
            "path": cfg.data.path,
            "read": read.num_read,
            "used": len(records),
            "skipped": dict(read.skipped),
            "skipped_examples": [str(e) for e in read.errors[:20]],
        },
        "tokenization": asdict(stats),
        "dropped_tail_samples": dropped_tail,
        "total_steps": total_steps,
        "final_metrics": result.metrics,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "tensorboard": storage.join(run_dir, "tensorboard"),
        "checkpoints_pruned": [],
        "model_dir": model_dir,
        "export": storage.read_json(export_stats) if storage.exists(export_stats) else None,
        "wall_time_s": round(time.time() - started, 1),
    }
    if model_dir is not None and not tc.keep_checkpoints_after_export:
        # The exported model is what later stages and users load; the optimizer checkpoints
        # (3x the model's size and more) only serve a resume, and this run is finished.
        report["checkpoints_pruned"] = prune_checkpoints(run_dir)
        report["checkpoint"] = None
    lease.check_held(run_dir)  # never mark a run finished that another run took over
    storage.write_json(storage.join(run_dir, "train_report.json"), report)
    return TrainOutcome(run_dir=run_dir, model_dir=model_dir, report=report)


def fit_leaving_ctrl_c_to_us(trainer):
    """``trainer.fit()``, with Ctrl-C left to the driver's own handling.

    Called from the main thread, Ray Train's ``fit`` installs its own SIGINT handler and never
    puts the previous one back: the first Ctrl-C aborts the run, the second does nothing, the
    third exits 0. After a training stage, a Ctrl-C in a later stage of the same driver (sampling,
    judging, evaluation) met that handler and was swallowed. Called from another thread, ``fit``
    installs none (that is how Ray Tune runs it): the main thread only waits here, so Ctrl-C
    raises KeyboardInterrupt as in every other stage -- the driver says what was kept and exits
    130, its actors end with it, and the rerun resumes from the last checkpoint.
    """
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 -- re-raised in the main thread below
            outcome["error"] = exc

    # A daemon: after a Ctrl-C the driver exits without waiting for fit to return.
    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)  # a Ctrl-C lands here, in the main thread
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def prune_checkpoints(run_dir: str) -> list[str]:
    """Delete the ``checkpoint_step*`` folders of a finished run; return their names."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(run_dir)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = sorted(
        i.base_name
        for i in infos
        if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_step")
    )
    for name in names:
        storage.delete_dir(storage.join(run_dir, name))
    return names
