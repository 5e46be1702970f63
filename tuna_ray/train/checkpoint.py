"""Training checkpoints through Ray Train: DeepSpeed shards + per-rank RNG state, saved with an
asynchronous upload, restored by each rank from only the files it needs.

Stage: train (Ray shell helpers of ``loop.py``). A checkpoint folder holds DeepSpeed's tag folder
``ckpt/`` (shared files such as ``mp_rank_00_model_states.pt``, and one optimizer shard per rank,
``*zero_pp_rank_<r>_*``, plus per-rank model shards under ZeRO-3) and ``rng_state_rank<r>.pt``.
Every rank writes its own files; Ray Train merges them into one folder in run storage.

Restore: a 7B checkpoint with optimizer state is ~94 GB, of which one rank needs its own shard
and the shared files. ``Checkpoint.as_directory()`` would download all of it to every node, so
``download_rank_files`` copies only ``rank_files(...)`` from the run storage. Resume is exact:
the RNG state (torch, CUDA, Python, NumPy) of each rank is restored, not reseeded, so dropout
and any other sampling continue as if the run had never stopped.
"""

from __future__ import annotations

import os
import posixpath
import random
import re
import tempfile

import numpy as np
import pyarrow.fs as pafs
import torch

CKPT_TAG = "ckpt"
_RANK_FILE = re.compile(r"(?:^|_)zero_pp_rank_(\d+)_|^rng_state_rank(\d+)\.pt$")


def rank_files(relative_paths: list[str], rank: int) -> list[str]:
    """The checkpoint files rank ``rank`` needs: every shared file and its own shards.

    >>> rank_files(["ckpt/mp_rank_00_model_states.pt", "latest",
    ...             "ckpt/zero_pp_rank_0_mp_rank_00_optim_states.pt",
    ...             "ckpt/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ...             "rng_state_rank0.pt", "rng_state_rank1.pt"], rank=1)
    ['ckpt/mp_rank_00_model_states.pt', 'latest', 'ckpt/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt', 'rng_state_rank1.pt']
    """
    keep = []
    for path in relative_paths:
        m = _RANK_FILE.search(posixpath.basename(path))
        if m is None or int(m.group(1) or m.group(2)) == rank:
            keep.append(path)
    return keep


def download_rank_files(checkpoint, rank: int, dest: str) -> list[str]:
    """Copy this rank's files of ``checkpoint`` (a ``ray.train.Checkpoint``) into ``dest``."""
    fs, root = checkpoint.filesystem, checkpoint.path
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = [posixpath.relpath(i.path, root) for i in infos if i.type == pafs.FileType.File]
    picked = rank_files(files, rank)
    local = pafs.LocalFileSystem()
    for rel in picked:
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        pafs.copy_files(
            posixpath.join(root, rel), target, source_filesystem=fs, destination_filesystem=local
        )
    return picked


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(engine, metrics: dict, rank: int, *, upload: str = "async") -> None:
    """Write this rank's shards + RNG state and report them to Ray Train (a barrier).

    ``upload="async"``: Ray uploads the folder in a background thread and deletes it after, so
    training goes on while a multi-GB checkpoint travels to cloud storage.
    """
    import ray.train
    from ray.train import CheckpointUploadMode

    step = metrics["step"]
    folder = tempfile.mkdtemp(prefix=f"tuna-ckpt-step{step}-rank{rank}-")
    engine.save_checkpoint(folder, tag=CKPT_TAG, client_state={"step": step})
    torch.save(rng_state(), os.path.join(folder, f"rng_state_rank{rank}.pt"))
    mode = CheckpointUploadMode.ASYNC if upload == "async" else CheckpointUploadMode.SYNC
    ray.train.report(
        metrics,
        checkpoint=ray.train.Checkpoint.from_directory(folder),
        checkpoint_dir_name=f"checkpoint_step{step:07d}",
        checkpoint_upload_mode=mode,
        delete_local_checkpoint_after_upload=True,
    )


def restore_checkpoint(engine, checkpoint, rank: int) -> tuple[int, list[str]]:
    """Load this rank's part of ``checkpoint`` into ``engine``; return (step, files read)."""
    with tempfile.TemporaryDirectory(prefix=f"tuna-restore-rank{rank}-") as tmp:
        files = download_rank_files(checkpoint, rank, tmp)
        _, client_state = engine.load_checkpoint(tmp, tag=CKPT_TAG)
        rng_file = os.path.join(tmp, f"rng_state_rank{rank}.pt")
        if os.path.exists(rng_file):
            set_rng_state(torch.load(rng_file, weights_only=False))
    return int(client_state["step"]), files
