"""DeepSpeed's CPU op, compiled ahead of the first run: ``python -m tuna_ray.train.cpu_ops``.

On CPU, DeepSpeed's communication backend compiles its shared-memory all-reduce op
(``deepspeed_shm_comm``) the first time a process group starts: ~40 s on two idle cores, and
19 minutes on the same machine beside other work (a fresh clone's test suite under two busy
loops) -- inside the first training's start, where it looks like a hang. ``make setup`` runs
this module once; the op lands in ``TORCH_EXTENSIONS_DIR`` and every later run loads it.
"""

from __future__ import annotations

import os


def extensions_dir() -> str:
    """Where torch keeps (and looks for) compiled ops: ``TORCH_EXTENSIONS_DIR`` or its default."""
    return os.environ.get("TORCH_EXTENSIONS_DIR", "~/.cache/torch_extensions")


def build_cpu_ops() -> list[str]:
    """Compile (or load, when already compiled) the CPU ops a training run uses; their names."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return []  # GPU machines use NCCL: nothing to compile ahead
    builder = accelerator.create_op_builder("ShareMemCommBuilder")
    # The condition under which deepspeed.comm builds it (deepspeed/comm/torch.py)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return []
    builder.load(verbose=False)
    return [builder.absolute_name()]


def main() -> None:
    ops = ", ".join(build_cpu_ops()) or "none needed"
    print(f"DeepSpeed CPU ops ready in {extensions_dir()}: {ops}")


if __name__ == "__main__":
    main()
