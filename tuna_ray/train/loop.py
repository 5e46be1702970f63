"""The Ray Train loop: one DeepSpeed engine per worker, read top to bottom.

Every worker reads the whole materialised, globally ordered dataset and keeps its own slice of
each step (see ``step_slices``), so the samples of step k are fixed by the data, not by timing:
after a restart from the checkpoint of step k, training continues with exactly the samples of
step k+1. Each checkpoint also writes the ids consumed since the previous one
(``consumed/rank{r}-*.json``) for audit.
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from tuna_ray import storage
from tuna_ray.config import TrainJobConfig

CKPT_TAG = "ckpt"
MAX = dist.ReduceOp.MAX


def step_slices(
    rows: Iterator[dict],
    *,
    rank: int,
    world: int,
    micro_batch: int,
    grad_accum: int,
    start_step: int,
    total_steps: int,
) -> Iterator[tuple[int, list[list[dict]]]]:
    """Yield ``(step, micro_batches)`` of this rank from the globally ordered row stream.

    Global batch G = micro_batch * grad_accum * world. Position q of a row inside its step goes
    to rank ``q % world``; each rank's rows are cut into ``grad_accum`` micro-batches.
    """
    global_batch = micro_batch * grad_accum * world
    mine: list[dict] = []
    for position, row in enumerate(rows):
        step, q = divmod(position, global_batch)
        if step < start_step:
            continue
        if step >= total_steps:
            return
        if q % world == rank:
            mine.append(row)
        if q == global_batch - 1:
            yield step, [mine[i : i + micro_batch] for i in range(0, len(mine), micro_batch)]
            mine = []


def _iter_rows(shard) -> Iterator[dict]:
    for batch in shard.iter_batches(batch_size=256, batch_format="numpy"):
        for i in range(len(batch["id"])):
            yield {
                "id": str(batch["id"][i]),
                "input_ids": [list(map(int, ids)) for ids in batch["input_ids"][i]],
                "prompt_len": [int(p) for p in batch["prompt_len"][i]],
            }


def _all_reduce(values, device, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce a small float64 vector across ranks (on ``device``: NCCL needs the GPU)."""
    t = torch.as_tensor(values, dtype=torch.float64).to(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t.cpu()


def _build_optimizer(model, cfg: TrainJobConfig):
    o = cfg.train.optim
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = {"lr": o.learning_rate, "betas": o.betas, "eps": o.eps, "weight_decay": o.weight_decay}
    if cfg.train.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    from tuna_ray.models import resolve_model
    from tuna_ray.train.collate import collate_ranked
    from tuna_ray.train.deepspeed_config import build_deepspeed_config, resolve_precision
    from tuna_ray.train.logprobs import candidate_logprobs
    from tuna_ray.train.loss import (
        LossNormaliser,
        length_normalised_scores,
        pairwise_accuracy,
        tuna_loss,
    )

    cfg = TrainJobConfig.model_validate(loop_config["job"])
    tc = cfg.train
    total_steps: int = loop_config["total_steps"]
    run_dir: str = loop_config["run_dir"]
    n_max: int = loop_config["max_candidates"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(tc.seed)
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
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code
    )
    if tc.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    optimizer = _build_optimizer(model, cfg)
    scheduler = get_scheduler(
        tc.optim.schedule,
        optimizer,
        num_warmup_steps=tc.optim.warmup_steps,
        num_training_steps=total_steps,
    )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    device = engine.device
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )

    # --- resume -----------------------------------------------------------------------------
    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            _, client_state = engine.load_checkpoint(ckpt_dir, tag=CKPT_TAG)
        start_step = int(client_state["step"])
    attempt = _shared_attempt_id()

    # --- train ------------------------------------------------------------------------------
    global_batch = tc.micro_batch_size * tc.gradient_accumulation_steps * world
    segment: dict[int, list[str]] = {}
    metrics: dict[str, Any] = {"step": start_step}
    history: list[dict] = []
    shard = ray.train.get_dataset_shard("train")
    engine.train()
    t_last = time.perf_counter()
    for step, micro_batches in step_slices(
        _iter_rows(shard),
        rank=rank,
        world=world,
        micro_batch=tc.micro_batch_size,
        grad_accum=tc.gradient_accumulation_steps,
        start_step=start_step,
        total_steps=total_steps,
    ):
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
        sums = torch.zeros(6, dtype=torch.float64)  # total, ranking, mle, right, pairs, tokens
        for b in batches:
            b = _to_device(b, device)
            logprob_sum, num_tokens = candidate_logprobs(engine.module, b)
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
            engine.step()
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
            "lr": scheduler.get_last_lr()[0],
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
        _maybe_inject_fault(tc, run_dir, rank, step=step + 1)
        last = step + 1 == total_steps
        if (step + 1) % tc.checkpoint_every == 0 or last:
            _save_checkpoint(engine, metrics, run_dir, rank, attempt, start_step, segment, history)
            segment, history = {}, []
        elif (step + 1) % tc.log_every == 0:
            ray.train.report(metrics)

    if tc.export:
        export_hf_model(engine, tokenizer, storage.join(run_dir, "hf_model"), rank, tc.zero_stage)


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


def _save_checkpoint(engine, metrics, run_dir, rank, attempt, resumed_from, segment, history):
    """Sharded DeepSpeed checkpoint + consumed ids since the previous one, reported to Ray."""
    import ray.train

    step = metrics["step"]
    first = min(segment) if segment else step
    storage.write_json(
        storage.join(run_dir, "consumed", f"rank{rank}-steps{first:07d}-{step:07d}.json"),
        {"attempt": attempt, "resumed_from_step": resumed_from, "steps": segment},
    )
    if rank == 0:
        storage.write_text(
            storage.join(run_dir, "metrics", f"steps{first:07d}-{step:07d}.jsonl"),
            "".join(json.dumps(m) + "\n" for m in history),
        )
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag=CKPT_TAG, client_state={"step": step})
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=f"checkpoint_step{step:07d}",
        )


def export_hf_model(engine, tokenizer, target: str, rank: int, zero_stage: int) -> None:
    """Write a HF folder (safetensors + tokenizer) of the trained weights to ``target``.

    Under ZeRO-3 every rank holds a shard; all ranks gather the full parameters together and
    rank 0 writes them.
    """
    import deepspeed

    model = engine.module
    if zero_stage == 3:
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            state = (
                {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                if rank == 0
                else None
            )
    else:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()} if rank == 0 else None
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            storage.upload_dir(tmp, target)
    if dist.is_initialized():
        dist.barrier()


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
