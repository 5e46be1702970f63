"""Digests of the evaluation: what identifies a model's weights, a stage's work, a task's result.

Stage: eval (no Ray). A result is reused exactly when its digest matches (tuna_ray/eval/run.py):

- ``model_fingerprint``: the evaluated weights (a hash of the model folder's files, or what the
  caller passes, e.g. the training stage's hash);
- ``stage_digest``: one Ray Data stage's work (its settings minus operational ones, the rows it
  gets, the model fingerprint): a stage with the same digest is skipped, a different one
  starts over (tuna_ray.ranking.runner.claim_output_dir);
- ``task_digest``: one task's result (model, generation settings, task settings, item content,
  judge, bootstrap settings; not scaling, timeouts, concurrency, QPS, caches or prices).
"""

from __future__ import annotations

import hashlib
import math

from tuna_ray import storage
from tuna_ray.config import config_hash
from tuna_ray.engines.factory import HFEngineSpec, OpenAIEngineSpec
from tuna_ray.eval.config import EvalModelConfig, RankingAgreementTask, merged_sampling
from tuna_ray.ranking.runner import OPERATIONAL

EVAL_VERSION = "eval-v1"  # bump when a scorer's numbers change: cached results stop matching
_SMALL_FILE = 8 << 20
_EDGE = 1 << 20


def _hash_folder(uri: str) -> str:
    """Names and sizes of a model folder's files, the content of small ones (config, tokenizer)
    and the first and last MiB of large ones (weights): cheap, and any re-export changes it."""
    import pyarrow.fs as pafs

    fs, root = storage.filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    digest = hashlib.sha256()
    for info in sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path):
        name = info.path.rsplit("/", 1)[-1]
        if name.startswith("."):
            continue
        digest.update(f"{name}\0{info.size}\0".encode())
        with fs.open_input_file(info.path) as f:
            if info.size <= _SMALL_FILE:
                digest.update(f.readall())
            else:
                digest.update(f.read_at(_EDGE, 0))
                digest.update(f.read_at(_EDGE, info.size - _EDGE))
    return "files:" + digest.hexdigest()[:16]


def model_fingerprint(model: EvalModelConfig) -> str:
    """What identifies the evaluated weights: ``model.fingerprint`` when given (the pipeline
    passes the training stage's hash), else a hash of the local (or pyarrow URI) folder's files,
    else ``hub:<id>`` (pin a revision by evaluating a local folder). A model served by an
    OpenAI-compatible endpoint adds ``model@base_url``."""
    if model.fingerprint:
        return model.fingerprint
    from tuna_ray.models import resolve_model

    path = resolve_model(model.name_or_path)
    fp = _hash_folder(path) if storage.exists(path) else f"hub:{model.name_or_path}"
    if isinstance(model.engine, OpenAIEngineSpec):
        fp += f"+openai:{model.engine.model}@{model.engine.base_url}"
    return fp


def engine_identity(engine) -> dict:
    """The engine settings that change results (an hf engine's path is in the fingerprint)."""
    exclude = set(OPERATIONAL["engine"]) | (
        {"model"} if isinstance(engine, HFEngineSpec) else set()
    )
    return engine.model_dump(mode="json", exclude=exclude)


def stage_digest(stage_cfg, rows: list[dict], fingerprint: str) -> str:
    """A Ray Data stage's work: its settings (not where it writes, how it scales, or its
    failure budget), its engine's identity, the rows it gets, the model's fingerprint."""
    exclude = {"output_dir", "scaling", "engine", "max_failure_share"}
    dumped = stage_cfg.model_dump(mode="json", exclude=exclude)
    return config_hash(
        {
            "stage": dumped,
            "engine": engine_identity(stage_cfg.engine),
            "rows": config_hash({"rows": rows}),
            "model": fingerprint,
        }
    )


def finite_json(value):
    """JSON-safe copy: NaN and infinities become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v) for v in value]
    return value


def task_digest(model, fingerprint: str, task, items_hash: str, bootstrap) -> str:
    """The cache key of one task's result (module docstring)."""
    exclude = {"name": True, "judge": {"scaling": True, "engine": set(OPERATIONAL["engine"])}}
    generation = None
    if not isinstance(task, RankingAgreementTask):
        engine = model.engine or HFEngineSpec(model=model.name_or_path)
        generation = {
            "engine": engine_identity(engine),
            "sampling": merged_sampling(model.generation, task.generation).model_dump(mode="json"),
        }
    elif isinstance(model.engine, HFEngineSpec):
        generation = {"engine": engine_identity(model.engine)}
    return config_hash(
        {
            "version": EVAL_VERSION,
            "model": {
                "fingerprint": fingerprint,
                "template": model.template,
                "system_prompt": model.system_prompt,
            },
            "task": task.model_dump(mode="json", exclude=exclude),
            "generation": generation,
            "items": items_hash,
            "bootstrap": bootstrap.model_dump(mode="json"),
        }
    )
