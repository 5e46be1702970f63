"""DeepSpeed's CPU op, compiled ahead of the first run: ``python -m tuna_ray.train.cpu_ops``.

On CPU, DeepSpeed's communication backend compiles its shared-memory all-reduce op
(``deepspeed_shm_comm``) the first time a process group starts: ~40 s on two idle cores, and
19 minutes on the same machine beside other work (a fresh clone's test suite under two busy
loops) -- inside the first training's start, where it looks like a hang. ``make setup`` runs
this module once; the op lands in ``TORCH_EXTENSIONS_DIR`` and every later run loads it.

Every process that builds or loads the op runs the same ``ninja``: the one this Python
environment installs (:func:`use_the_environments_ninja`).
"""

from __future__ import annotations

import os


def extensions_dir() -> str:
    """Where torch keeps (and looks for) compiled ops: ``TORCH_EXTENSIONS_DIR`` or its default."""
    return os.environ.get("TORCH_EXTENSIONS_DIR", "~/.cache/torch_extensions")


def use_the_environments_ninja() -> None:
    """Put the ``ninja`` of this Python environment (the ``ninja`` package, which DeepSpeed
    requires) first on this process's PATH, for torch's op builds here and in its children.

    torch runs whichever ``ninja`` PATH finds first, and ninja versions record a build's command
    differently: what a system ninja (1.11) built, the environment's (1.13) builds again, and
    back. Measured: the op was compiled twice within one ``make test`` and 12 times in a day
    on one machine (19-135 s a build), by processes with and without the venv's ``bin`` on
    PATH (an activated venv, the test's own ``ray start``); every training there waited for it.
    """
    try:
        import ninja
    except ImportError:  # torch then finds none, or the one on PATH
        return
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != ninja.BIN_DIR:
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path]) if path else ninja.BIN_DIR


def build_cpu_ops() -> list[str]:
    """Compile (or load, when already compiled) the CPU ops a training run uses; their names."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    use_the_environments_ninja()
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
