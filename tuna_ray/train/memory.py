"""A per-GPU memory estimate for a training config, before anyone pays for GPUs.

Stage: train (pure arithmetic). The shipped 7B configs carry this estimate as a comment, and a
test checks that it fits the accelerator they pin. Terms, for P parameters over W GPUs with
ZeRO-3 and mixed precision (bf16/fp16 weights, fp32 master copy, AdamW):

- model states: 2P (16-bit weights) + 4P (fp32 gradient partition) + 4P (fp32 master weights)
  + 8P (Adam m and v), all partitioned: 18P / W bytes (ZeRO-2 keeps the 16-bit weights whole:
  2P + 16P / W). CPU offload moves the fp32 parts (and with ``offload_params`` the weights) to
  host memory.
- gathered weights: ZeRO-3 materialises at most ``stage3_max_live_parameters`` (DeepSpeed's
  default 1e9) parameters at once, 2 bytes each.
- activations: with gradient checkpointing, each layer's input is kept (layers x T x hidden x
  2 bytes, T = micro_batch x N x max_length tokens, the padded worst case) plus one layer
  recomputed in backward (~ T x (6 x hidden + 3 x intermediate) x 2 bytes, counted twice for its
  gradients).
- output head: fp32 logits of the response tokens (T x vocab x 4 bytes) and their gradient.
- runtime: CUDA context, NCCL buffers and allocator fragmentation, a flat 3 GB.

It is an estimate of the order of magnitude (within ~20 %), not a guarantee: use it to choose
instance types and offload, then read ``peak_gpu_mem_mb`` of the first steps.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
LIVE_PARAMETERS = 1e9  # DeepSpeed's stage3_max_live_parameters default
RUNTIME_BYTES = 3 * GB


@dataclass(frozen=True)
class ModelShape:
    params: float
    layers: int
    hidden: int
    intermediate: int
    vocab: int


# Llama-2/LLaMA-7B (the paper's Alpaca-7B student).
LLAMA_7B = ModelShape(params=6.74e9, layers=32, hidden=4096, intermediate=11008, vocab=32000)


@dataclass(frozen=True)
class MemoryEstimate:
    model_states: float
    gathered_weights: float
    activations: float
    output_head: float
    runtime: float = RUNTIME_BYTES

    @property
    def total(self) -> float:
        return (
            self.model_states
            + self.gathered_weights
            + self.activations
            + self.output_head
            + self.runtime
        )

    def table(self) -> str:
        rows = [
            ("model states", self.model_states),
            ("gathered weights", self.gathered_weights),
            ("activations", self.activations),
            ("output head", self.output_head),
            ("runtime", self.runtime),
            ("total", self.total),
        ]
        return "\n".join(f"{name:>16}: {value / GB:5.1f} GB" for name, value in rows)


def estimate_gpu_memory(
    shape: ModelShape,
    *,
    world: int,
    zero_stage: int,
    micro_batch: int,
    num_candidates: int,
    max_length: int,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    gradient_checkpointing: bool = True,
) -> MemoryEstimate:
    """Bytes per GPU for one training step of ``shape`` (see the module docstring)."""
    p = shape.params
    weights = 2 * p / world if zero_stage == 3 else 2 * p
    fp32_states = 16 * p / world  # gradient partition 4 + master 4 + Adam 8
    if offload_optimizer:
        fp32_states = 0.0
    if offload_params:
        weights = 0.0
    tokens = micro_batch * num_candidates * max_length
    layer_work = tokens * (6 * shape.hidden + 3 * shape.intermediate) * 2
    if gradient_checkpointing:
        activations = shape.layers * tokens * shape.hidden * 2 + 2 * layer_work
    else:
        activations = shape.layers * 2 * layer_work
    return MemoryEstimate(
        model_states=weights + fp32_states,
        gathered_weights=2 * min(LIVE_PARAMETERS, p) if zero_stage == 3 else 0.0,
        activations=activations,
        output_head=2 * tokens * shape.vocab * 4,
    )
