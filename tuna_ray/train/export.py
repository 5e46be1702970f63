"""Export the trained weights as a Hugging Face folder (safetensors + tokenizer).

Stage: train. Under ZeRO-3 every rank holds a shard of every parameter. The state dict is
gathered one module at a time (as DeepSpeed's own consolidated 16-bit state dict does): the
ranks all-gather one module's parameters, rank 0 copies them to host memory, and the gathered
copies are released before the next module. A 7B model never sits whole on any GPU, and only
rank 0 holds the host copy. ``GatherStats`` records the largest number of parameters gathered
at once, which the training report shows.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tuna_ray import storage


@dataclass
class GatherStats:
    total_params: int = 0
    max_gathered_params: int = 0  # the most parameters materialised at once on a rank


def gathered_state_dict(
    model: torch.nn.Module, *, rank: int, zero_stage: int
) -> tuple[dict[str, torch.Tensor] | None, GatherStats]:
    """``(state dict on rank 0 (None elsewhere), stats)``; collective under ZeRO-3."""
    stats = GatherStats()
    if zero_stage != 3:
        stats.total_params = stats.max_gathered_params = sum(p.numel() for p in model.parameters())
        if rank != 0:
            return None, stats
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}, stats

    import deepspeed

    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()  # tied parameters (embedding = output head) are exported once

    def visit(module: torch.nn.Module, prefix: str) -> None:
        params = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        numel = sum(getattr(p, "ds_numel", p.numel()) for _, p in params)
        stats.total_params += numel
        stats.max_gathered_params = max(stats.max_gathered_params, numel)
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            if rank == 0:
                for name, p in params:
                    state[prefix + name] = p.detach().cpu().clone()
                for name, buf in module.named_buffers(recurse=False):
                    if name not in module._non_persistent_buffers_set:
                        state[prefix + name] = buf.detach().cpu().clone()
        seen.update(id(p) for _, p in params)
        for name, child in module.named_children():
            visit(child, prefix + name + ".")

    visit(model, "")
    return (state if rank == 0 else None), stats


def export_hf_model(lm, tokenizer, target: str, *, rank: int, zero_stage: int) -> GatherStats:
    """Write ``lm``'s trained weights and ``tokenizer`` to ``target`` (a path or URI)."""
    state, stats = gathered_state_dict(lm, rank=rank, zero_stage=zero_stage)
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            lm.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            storage.upload_dir(tmp, target)
    if dist.is_initialized():
        dist.barrier()
    return stats
