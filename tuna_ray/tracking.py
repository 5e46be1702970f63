"""Metrics where users look: TensorBoard event files in the run directory, always.

Training writes its per-step metrics to ``<train run>/metrics/*.jsonl`` (durable, checkpoint by
checkpoint, in the run storage); when the stage ends they become TensorBoard scalars under
``<train run>/tensorboard/``, and an evaluation's results under ``<eval>/tensorboard/<model>/``
(one TensorBoard run per model, so the models compare on one chart). Point TensorBoard at the
run directory (``tensorboard --logdir runs/demo``; for ``s3://`` run directories copy them down
first). Written with tensorboardX (a Ray Train dependency); local or object storage alike.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile

from tuna_ray import storage

log = logging.getLogger(__name__)

# Bookkeeping columns of the step metrics that are not curves.
_NOT_SCALARS = {"step", "total_steps"}


def read_metrics(run_dir: str) -> list[dict]:
    """Per-step training metrics, sorted by step; a step logged twice (resume) keeps its last."""
    by_step: dict[int, dict] = {}
    for path in storage.list_files(storage.join(run_dir, "metrics")):
        if not path.endswith(".jsonl"):
            continue
        for line in storage.read_text(path).splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash
            if isinstance(row, dict) and isinstance(row.get("step"), int | float):
                by_step[int(row["step"])] = row
    return [by_step[k] for k in sorted(by_step)]


def _scalars(row: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in row.items()
        if k not in _NOT_SCALARS
        and isinstance(v, int | float)
        and not isinstance(v, bool)
        and math.isfinite(v)
    }


def _write(uri: str, points: list[tuple[int, dict[str, float]]], prefix: str) -> None:
    from tensorboardX import SummaryWriter

    with tempfile.TemporaryDirectory(prefix="tuna-tb-") as local:
        writer = SummaryWriter(logdir=local, flush_secs=3600)
        for step, scalars in points:
            for name, value in scalars.items():
                writer.add_scalar(f"{prefix}/{name}", value, global_step=step)
        writer.close()
        # One file per write: a rerun replaces the folder's contents, never appends twice.
        storage.delete_dir(uri)
        storage.upload_dir(local, uri)


def write_training(run_dir: str) -> str:
    """``run_dir/metrics/*.jsonl`` -> ``run_dir/tensorboard/`` (tags ``train/<metric>``)."""
    uri = storage.join(run_dir, "tensorboard")
    rows = read_metrics(run_dir)
    _write(uri, [(int(r["step"]), _scalars(r)) for r in rows], "train")
    return uri


def write_eval(output_dir: str, per_model: list[dict]) -> str:
    """Each model's task metrics -> ``output_dir/tensorboard/<label>/`` (tags
    ``eval/<task>/<metric>``, step 0): one TensorBoard run per model."""
    uri = storage.join(output_dir, "tensorboard")
    for results in per_model:
        label = results["model"].get("label") or "model"
        scalars = {
            f"{task}/{k}": v
            for task, metrics in results["tasks"].items()
            for k, v in _scalars(metrics).items()
        }
        _write(storage.join(uri, label), [(0, scalars)], "eval")
    return uri
