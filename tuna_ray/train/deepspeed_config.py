"""DeepSpeed configuration for one training run, as a plain dict (pure, testable on CPU).

The optimizer and LR schedule are built in the train loop and handed to ``deepspeed.initialize``
(so CPU runs need no compiled fused optimizer); the dict carries batch geometry, ZeRO stage,
offload, precision and clipping (none by default, as the reference).
"""

from __future__ import annotations

from typing import Any

from tuna_ray.config import TrainConfig


def resolve_precision(train: TrainConfig, *, on_gpu: bool, bf16_supported: bool) -> str:
    """``auto`` -> bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if train.precision != "auto":
        if train.precision in ("bf16", "fp16") and not on_gpu:
            raise ValueError(f"train.precision={train.precision} needs a GPU; use fp32 on CPU")
        return train.precision
    if not on_gpu:
        return "fp32"
    return "bf16" if bf16_supported else "fp16"


def build_deepspeed_config(train: TrainConfig, *, precision: str) -> dict[str, Any]:
    """The DeepSpeed config dict for ``train`` at the given resolved precision."""
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.zero_stage >= 1 and train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": precision != "fp32"}
    if train.offload_params:
        if train.zero_stage != 3:
            raise ValueError("train.offload_params needs train.zero_stage=3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": precision != "fp32"}
    if train.zero_stage == 3:
        # Export gathers the full weights explicitly (see loop.export_hf_model).
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # we log through ray.train.report
        "wall_clock_breakdown": False,
    }
    if train.optim.max_grad_norm is not None:
        config["gradient_clipping"] = train.optim.max_grad_norm
    if train.offload_optimizer:
        # DeepSpeedCPUAdam is passed as the client optimizer; tell ZeRO that is intended.
        config["zero_force_ds_cpu_optimizer"] = True
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return config
