"""The Ray Train loop: one DeepSpeed engine per worker, read top to bottom.

The driver (trainer.py / dataset.py) fixes a global sample order and gives every row its
``position`` in it; position q of step s = q // G goes to rank ``(q % G) % world`` (G the global
batch). Each rank reads only its own dataset (``rank<r>``), already in position order, so the
samples of step k are fixed by the data, not by timing or worker count: after a restart from the
checkpoint of step k, training continues with exactly the samples of step k+1, and with the RNG
state each rank had then (checkpoint.py). Each checkpoint also writes the ids consumed since the
previous one (``consumed/rank{r}-*.json``) and the files each rank restored from.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
import uuid
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from tuna_ray import storage
from tuna_ray.config import TrainJobConfig
from tuna_ray.progress import duration
from tuna_ray.train.cpu_ops import extensions_dir, use_the_environments_ninja

MAX = dist.ReduceOp.MAX
log = logging.getLogger(__name__)


def step_slices(
    rows: Iterator[dict],
    *,
    micro_batch: int,
    grad_accum: int,
    global_batch: int,
    start_step: int,
    total_steps: int,
) -> Iterator[tuple[int, list[list[dict]]]]:
    """Yield ``(step, micro_batches)`` from this rank's rows (ordered by ``position``).

    A rank holds ``micro_batch * grad_accum`` rows of every step; steps before ``start_step``
    (done before a restart) are skipped.
    """
    per_rank = micro_batch * grad_accum
    mine: list[dict] = []
    current = None
    for row in rows:
        step = row["position"] // global_batch
        if step >= total_steps:
            break
        if step < start_step:
            continue
        if current is not None and step != current:
            raise RuntimeError(f"step {current} got {len(mine)} of {per_rank} rows")
        current = step
        mine.append(row)
        if len(mine) == per_rank:
            yield step, [mine[i : i + micro_batch] for i in range(0, per_rank, micro_batch)]
            mine, current = [], None
    if mine:
        raise RuntimeError(f"step {current} got {len(mine)} of {per_rank} rows")


def _iter_rows(shard) -> Iterator[dict]:
    for batch in shard.iter_batches(batch_size=256, batch_format="numpy"):
        for i in range(len(batch["id"])):
            yield {
                "id": str(batch["id"][i]),
                "position": int(batch["position"][i]),
                "input_ids": [list(map(int, ids)) for ids in batch["input_ids"][i]],
                "prompt_len": [int(p) for p in batch["prompt_len"][i]],
            }


def _all_reduce(values, device, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce a small float64 vector across ranks (on ``device``: NCCL needs the GPU)."""
    t = torch.as_tensor(values, dtype=torch.float64).to(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t.cpu()


def build_optimizer(params, cfg: TrainJobConfig):
    o = cfg.train.optim
    params = [p for p in params if p.requires_grad]
    kwargs = {"lr": o.learning_rate, "betas": o.betas, "eps": o.eps, "weight_decay": o.weight_decay}
    if cfg.train.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def build_scheduler(optimizer, cfg: TrainJobConfig, total_steps: int):
    """transformers' schedule: linear warmup from 0 over ``warmup_steps``, then ``schedule``."""
    from transformers import get_scheduler

    o = cfg.train.optim
    return get_scheduler(
        o.schedule, optimizer, num_warmup_steps=o.warmup_steps, num_training_steps=total_steps
    )


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    from tuna_ray.models import resolve_model
    from tuna_ray.ray_setup import quiet_ray_data
    from tuna_ray.train.checkpoint import restore_checkpoint, save_checkpoint
    from tuna_ray.train.collate import collate_ranked
    from tuna_ray.train.deepspeed_config import build_deepspeed_config, resolve_precision
    from tuna_ray.train.export import export_hf_model
    from tuna_ray.train.logprobs import CandidateScorer
    from tuna_ray.train.loss import (
        LossNormaliser,
        length_normalised_scores,
        pairwise_accuracy,
        tuna_loss,
    )
    from tuna_ray.train.packing import pack_ranked

    _quiet_worker()
    use_the_environments_ninja()  # DeepSpeed loads (or builds) its CPU op with it
    cfg = TrainJobConfig.model_validate(loop_config["job"])
    tc = cfg.train
    total_steps: int = loop_config["total_steps"]
    run_dir: str = loop_config["run_dir"]
    n_max: int = loop_config["max_candidates"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(tc.seed)  # a resumed run restores the checkpoint's RNG state instead
    # Ray pins OMP threads to 1 unless told; use the CPUs this worker reserved.
    if not cfg.scaling.use_gpu:
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))

    # --- model, optimizer, schedule, engine -------------------------------------------------
    on_gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
    precision = resolve_precision(
        tc, on_gpu=on_gpu, bf16_supported=on_gpu and torch.cuda.is_bf16_supported()
    )
    ds_config = build_deepspeed_config(tc, precision=precision)
    # ZeRO-3 must partition weights while they load: HfDeepSpeedConfig has to exist (and stay
    # referenced) before from_pretrained.
    hf_ds_config = HfDeepSpeedConfig(ds_config) if tc.zero_stage == 3 else None  # noqa: F841
    model_path = resolve_model(cfg.model.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(
        model_path, trust_remote_code=cfg.model.trust_remote_code
    )
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    lm = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code
    )
    if tc.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.config.use_cache = False
    scorer = CandidateScorer(lm, head_chunk_logits=tc.head_chunk_logits)
    optimizer = build_optimizer(scorer.parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    if rank == 0 and not on_gpu:
        log.info(
            "train: starting DeepSpeed (its CPU op is compiled on a machine's first run unless "
            "`python -m tuna_ray.train.cpu_ops` built it: ~1 min; cached in %s)",
            extensions_dir(),
        )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=scorer, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    device = engine.device
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )

    # --- resume -----------------------------------------------------------------------------
    start_step, restored_files = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        start_step, restored_files = restore_checkpoint(engine, checkpoint, rank)
    attempt = _shared_attempt_id()

    # --- train ------------------------------------------------------------------------------
    global_batch = tc.micro_batch_size * tc.gradient_accumulation_steps * world
    segment: dict[int, list[str]] = {}
    history: list[dict] = []
    quiet_ray_data()  # the loop prints its own per-step progress
    shard = ray.train.get_dataset_shard(f"rank{rank}")
    engine.train()
    progress = StepProgress(total_steps, start_step)
    t_last = time.perf_counter()
    for step, micro_batches in step_slices(
        _iter_rows(shard),
        micro_batch=tc.micro_batch_size,
        grad_accum=tc.gradient_accumulation_steps,
        global_batch=global_batch,
        start_step=start_step,
        total_steps=total_steps,
    ):
        if tc.formulation == "packed":
            batches = [pack_ranked(mb, pad_id, n_max, tc.pack_row_tokens) for mb in micro_batches]
        else:
            batches = [collate_ranked(mb, pad_id, n_max) for mb in micro_batches]
        # Global denominators so that the step's loss does not depend on how the global batch is
        # split over micro-batches and ranks (see tuna_ray.train.loss).
        local = LossNormaliser.sum(
            LossNormaliser.from_batch(b.mask, b.num_tokens, tc.mle_target) for b in batches
        ).padded(n_max - 1)
        reduced = _all_reduce(
            torch.cat([local.pairs_per_gap.double(), local.mle_tokens.double()[None]]), device
        )
        normaliser = LossNormaliser(reduced[:-1].to(device), reduced[-1].to(device))
        # The rate this step's update uses (the scheduler advances inside the last engine.step).
        lr = scheduler.get_last_lr()[0]
        sums = torch.zeros(6, dtype=torch.float64)  # total, ranking, mle, right, pairs, tokens
        for b in batches:
            b = _to_device(b, device)
            logprob_sum, num_tokens = engine(b)
            parts = tuna_loss(
                logprob_sum,
                num_tokens,
                b.mask,
                margin=tc.margin,
                mle_weight=tc.mle_weight,
                mle_target=tc.mle_target,
                normaliser=normaliser,
            )
            # DeepSpeed averages gradients over ranks; the loss is already a global-batch sum.
            engine.backward(parts.total * world, scale_wrt_gas=False)
            right, pairs = pairwise_accuracy(
                length_normalised_scores(logprob_sum, num_tokens).detach(), b.mask
            )
            sums += torch.tensor(
                [
                    parts.total.item(),
                    parts.ranking.item(),
                    parts.mle.item(),
                    right.item(),
                    pairs.item(),
                    b.num_real_tokens,
                ],
                dtype=torch.float64,
            )
            engine.step()  # an optimizer step only at the accumulation boundary
        for mb in micro_batches:
            segment.setdefault(step + 1, []).extend(row["id"] for row in mb)
        sums = _all_reduce(sums, device)
        now = time.perf_counter()
        metrics = {
            "step": step + 1,
            "total_steps": total_steps,
            "loss": sums[0].item(),
            "ranking_loss": sums[1].item(),
            "mle_loss": sums[2].item(),
            "ranking_accuracy": (sums[3] / sums[4]).item() if sums[4] > 0 else float("nan"),
            "lr": lr,
            "grad_norm": _grad_norm(engine),
            "tokens_per_s": sums[5].item() / max(now - t_last, 1e-9),
            "samples_seen": (step + 1) * global_batch,
            "epoch": (step + 1) * global_batch / loop_config["samples_per_epoch"],
            # Peak memory of the worst rank: host RSS, and GPU memory when on a GPU.
            "peak_rss_mb": _all_reduce(
                [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024], device, MAX
            ).item(),
        }
        if on_gpu:
            peak = torch.cuda.max_memory_allocated() / 2**20
            metrics["peak_gpu_mem_mb"] = _all_reduce([peak], device, MAX).item()
        t_last = now
        history.append(metrics)
        if rank == 0:
            progress.update(step + 1, metrics)
        _maybe_inject_fault(tc, run_dir, rank, step=step + 1)
        last = step + 1 == total_steps
        if (step + 1) % tc.checkpoint_every == 0 or last:
            _write_segment(run_dir, rank, attempt, start_step, restored_files, segment, history)
            save_checkpoint(engine, metrics, rank, upload=tc.checkpoint_upload)
            segment, history = {}, []
        elif (step + 1) % tc.log_every == 0:
            ray.train.report(metrics)

    if tc.export:
        stats = export_hf_model(
            engine.module.lm,
            tokenizer,
            storage.join(run_dir, "hf_model"),
            rank=rank,
            zero_stage=tc.zero_stage,
        )
        if rank == 0:
            storage.write_json(storage.join(run_dir, "export_stats.json"), stats.__dict__)


def _quiet_worker() -> None:
    """A training worker prints its per-step line (rank 0) and what goes wrong, not the
    libraries' progress bars, per-report INFO lines or their deprecation notices."""
    import warnings

    import transformers
    from ray.train.v2._internal.execution import context as train_context

    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    # Ray Train logs every ray.train.report at INFO under a logger named after its file.
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    # DeepSpeed still calls torch.distributed.*_into_tensor (renamed in torch 2.13).
    warnings.filterwarnings("ignore", r".*torch\.distributed\.\w+. is deprecated", FutureWarning)


class StepProgress:
    """One line per step on rank 0 (the driver shows it, as do ``ray job logs``): where the
    run is, how fast it goes, when it ends."""

    def __init__(self, total_steps: int, start_step: int):
        self.total, self.start, self.t0 = total_steps, start_step, time.perf_counter()

    def update(self, step: int, metrics: dict) -> None:
        elapsed = time.perf_counter() - self.t0
        per_step = elapsed / max(step - self.start, 1)
        eta = per_step * (self.total - step)
        log.info(
            "train: step %d/%d (%.0f%%) loss %.4f ranking acc %.2f lr %.2e | %.1f s/step, ETA %s",
            step,
            self.total,
            100 * step / self.total,
            metrics["loss"],
            metrics["ranking_accuracy"],
            metrics["lr"],
            per_step,
            duration(eta),
        )


def _shared_attempt_id() -> str:
    """One id per (re)start of the worker group, the same on every rank."""
    box = [uuid.uuid4().hex[:8]]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _to_device(batch, device):
    from dataclasses import fields, replace

    return replace(batch, **{f.name: getattr(batch, f.name).to(device) for f in fields(batch)})


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def _write_segment(run_dir, rank, attempt, resumed_from, restored_files, segment, history):
    """Ids consumed per step since the previous checkpoint (per rank) and the metrics."""
    step = history[-1]["step"]
    first = min(segment) if segment else step
    storage.write_json(
        storage.join(run_dir, "consumed", f"rank{rank}-steps{first:07d}-{step:07d}.json"),
        {
            "rank": rank,
            "attempt": attempt,
            "resumed_from_step": resumed_from,
            "restored_files": restored_files,
            "steps": segment,
        },
    )
    if rank == 0:
        storage.write_text(
            storage.join(run_dir, "metrics", f"steps{first:07d}-{step:07d}.jsonl"),
            "".join(json.dumps(m) + "\n" for m in history),
        )


def _maybe_inject_fault(tc, run_dir: str, rank: int, step: int) -> None:
    """Testing hook (``train.fail_at_step``): die hard once, to exercise recovery.

    The controller learns of a reported checkpoint at its next health check of the workers
    (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default); a worker that dies sooner than
    that falls back to the checkpoint before. The hook waits two intervals first, so it models
    a crash some time after the last checkpoint, deterministically.
    """
    if step != tc.fail_at_step or rank != tc.fail_rank:
        return
    marker = storage.join(run_dir, "fault_injected")
    if storage.exists(marker):
        return
    storage.write_text(marker, f"rank {rank} exited at step {step}\n")
    time.sleep(2 * float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2")) + 1)
    os._exit(1)
