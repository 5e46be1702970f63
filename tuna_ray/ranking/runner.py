"""The shared Ray Data shell of the generation stages (sampling, probabilistic, contextual).

``run_stage`` is the driver of one stage: skip it when its manifest has the same config hash;
otherwise send the records without a result yet through an actor pool of the stage's UDF,
count the per-row summaries the UDF returns, consolidate the parts into ``<output>.parquet`` +
``failures.jsonl`` and write the manifest (tuna_ray.data.parts). Each UDF batch writes its
own part before returning, so a crash loses at most the batches in flight.

Every UDF (an ``EngineUDF``) returns at least the columns ``id``, ``status`` ("ok" | "failed" |
"excluded"), ``reason``; plus the stage's own count columns and the engine usage deltas
(USAGE_FIELDS), which ``EngineUDF.finish`` puts on the first row of a batch.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass

from pydantic import BaseModel

from tuna_ray import storage
from tuna_ray.config import config_hash
from tuna_ray.data import parts
from tuna_ray.data.templates import render_prompt
from tuna_ray.engines.base import Prompt

log = logging.getLogger(__name__)
USAGE_FIELDS = ("requests", "cached", "prompt_tokens", "completion_tokens", "cost_usd", "retries")


@dataclass(frozen=True)
class StageSpec:
    name: str  # report name, e.g. "rank_probabilistic"
    output: str  # consolidated file name, e.g. "ranked"
    udf: type  # Ray Data UDF class, constructed with ``config_json``
    count_fields: tuple[str, ...] = ()  # summary columns summed into the report
    mean_fields: tuple[str, ...] = ()  # summary columns averaged (NaN rows left out)


def build_prompt(record: dict, template: str, tokenizer=None, system: str | None = None) -> Prompt:
    """The request for one instruction: Alpaca text, or chat messages for the chat template."""
    if template == "alpaca":
        text = render_prompt(record["instruction"], record.get("input") or "")
        return Prompt(id=record["id"], text=text, messages=({"role": "user", "content": text},))
    user = record["instruction"]
    if (record.get("input") or "").strip():
        user += "\n\n" + record["input"]
    messages = ({"role": "system", "content": system},) if system else ()
    messages += ({"role": "user", "content": user},)
    text = (
        render_prompt(
            record["instruction"],
            record.get("input") or "",
            template="chat",
            tokenizer=tokenizer,
            system=system,
        )
        if tokenizer is not None
        else None
    )
    return Prompt(id=record["id"], text=text, messages=messages)


class EngineUDF:
    """Base of the stages' Ray Data UDFs: the stage config and one engine per actor.

    Subclasses set ``config_model`` and call ``finish`` at the end of ``__call__``.
    """

    config_model: type[BaseModel]

    def __init__(self, config_json: str):
        from tuna_ray.engines.factory import build_engine

        self.cfg = self.config_model.model_validate_json(config_json)
        self.engine = build_engine(self.cfg.engine)
        self.tokenizer = getattr(self.engine, "tokenizer", None)

    def finish(
        self, records: list[dict], failures: list[dict], summary: list[dict], usage_before
    ) -> dict[str, list]:
        """Write the batch's part; return the summary columns plus the usage deltas (the batch
        total on row 0, zeros after)."""
        parts.write_part(self.cfg.output_dir, records, failures)
        columns = {k: [row[k] for row in summary] for k in summary[0]}
        after = self.engine.usage()
        for name in USAGE_FIELDS:
            delta = getattr(after, name) - getattr(usage_before, name)
            columns[name] = [delta] + [0] * (len(summary) - 1)
        return columns


def input_report(cfg_input, read, used: int) -> dict:
    return {
        "path": cfg_input.path,
        "read": read.num_read,
        "used": used,
        "skipped": dict(read.skipped),
        "skipped_examples": [str(e) for e in read.errors[:20]],
    }


# Fields that change how a stage runs, not what it produces: changing them keeps the results.
OPERATIONAL = {
    "scaling": True,
    "retry_failed": True,
    "engine": {
        "api_key_env",
        "max_concurrency",
        "qps",
        "timeout_s",
        "max_retries",
        "backoff_base_s",
        "backoff_max_s",
        "cache_dir",
        "price_per_1m_input",
        "price_per_1m_output",
        "replicas",
        "batch_size",
    },
}


def stage_digest(cfg: BaseModel) -> str:
    """Hash of everything in a stage config that determines its results."""
    return config_hash(cfg.model_dump(mode="json", exclude=OPERATIONAL))


def finished_manifest(
    cfg: BaseModel, output_dir: str, force: bool = False
) -> tuple[str, dict | None]:
    """(config hash, the manifest if this stage already finished with this config)."""
    digest = stage_digest(cfg)
    manifest = parts.read_manifest(output_dir)
    if manifest is not None and manifest.get("config_hash") == digest and not force:
        log.info("%s: finished with this config, skipping", output_dir)
        return digest, manifest
    return digest, None


def claim_output_dir(output_dir: str, digest: str) -> None:
    """Make ``output_dir`` this config's: results of a different config are removed first.

    Resuming is only sound for the same config; a changed config starts the stage over (its
    upstream outputs, and the engine's response cache, are untouched).
    """
    stamp = storage.join(output_dir, "config_hash.txt")
    if storage.exists(stamp) and storage.read_text(stamp).strip() != digest:
        log.warning("%s: config changed, discarding the previous results", output_dir)
        storage.delete_dir(output_dir)
    if not storage.exists(stamp):
        storage.write_text(stamp, digest + "\n")


def with_endpoints(cfg: BaseModel, endpoints: dict[str, str] | None) -> BaseModel:
    """``cfg`` with an ``embedded:<name>`` engine base_url replaced by the running server's.

    Only the copy handed to the workers changes: the stage's config hash keeps the symbolic
    name, so a rerun with a server on another port still counts as the same config.
    """
    engine = getattr(cfg, "engine", None)
    url = getattr(engine, "base_url", "")
    if not url.startswith("embedded:"):
        return cfg
    name = url.removeprefix("embedded:")
    if not endpoints or name not in endpoints:
        raise ValueError(
            f"engine.base_url={url}: no embedded server {name!r} is running; "
            "embedded servers are started by `tuna-ray run` (pipeline servers:)"
        )
    return cfg.model_copy(
        update={"engine": engine.model_copy(update={"base_url": endpoints[name]})}
    )


def run_stage(
    spec: StageSpec,
    cfg: BaseModel,
    records: list[dict],
    *,
    digest: str,
    input_info: dict,
    endpoints: dict[str, str] | None = None,
) -> dict:
    """Run the stage over ``records`` (resuming by id) and return the written manifest."""
    import ray.data

    from tuna_ray.ray_setup import ensure_ray

    if getattr(cfg.engine, "kind", None) == "vllm":
        # tuna_ray.engines.vllm_engine builds the ray.data.llm processor, but the stages'
        # per-instruction logic (resampling, diversity trials, judge re-asks) is not yet wired to
        # it; refuse before any GPU is requested.
        raise ValueError(
            f"{spec.name}: engine kind 'vllm' is not wired into the stages yet; use "
            "kind 'hf' on GPU actors, or kind 'openai' against a vLLM server"
        )
    started = time.time()
    output_dir, scaling = cfg.output_dir, cfg.scaling
    claim_output_dir(output_dir, digest)
    order = [r["id"] for r in records]
    done = parts.finished_ids(output_dir) & set(order)
    todo = [r for r in records if r["id"] not in done]
    log.info(
        "%s: %d records, %d done before, %d to do", spec.name, len(records), len(done), len(todo)
    )
    totals: Counter = Counter()
    means: dict[str, list[float]] = {k: [] for k in spec.mean_fields}
    if todo:
        ensure_ray(scaling.ray_address)
        ds = ray.data.from_items(todo).map_batches(
            spec.udf,
            fn_constructor_kwargs={"config_json": with_endpoints(cfg, endpoints).model_dump_json()},
            batch_size=scaling.batch_size,
            compute=ray.data.ActorPoolStrategy(size=scaling.actors),
            num_cpus=scaling.cpus_per_actor,
            num_gpus=scaling.gpus_per_actor,
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            totals.update(str(s) for s in batch["status"])
            for key in (*spec.count_fields, *USAGE_FIELDS):
                totals[key] += float(batch[key].sum())
            for key in spec.mean_fields:
                means[key].extend(float(v) for v in batch[key] if not math.isnan(v))
    path, written, failed = parts.consolidate(output_dir, spec.output, order)
    report = {
        "stage": spec.name,
        "config_hash": digest,
        "output": path,
        "input": input_info,
        "counts": {
            spec.output: len(written),
            "failed": len(failed),
            "done_before": len(done),
            "failure_reasons": dict(Counter(f["reason"].split(":")[0] for f in failed)),
            **{k: int(totals[k]) for k in spec.count_fields},
        },
        "means_this_run": {k: (sum(v) / len(v) if v else None) for k, v in means.items()},
        "usage_this_run": {k: totals[k] for k in USAGE_FIELDS},
        "wall_time_s": round(time.time() - started, 1),
    }
    parts.write_manifest(output_dir, report)
    return report


def run_from_config(
    spec: StageSpec,
    cfg: BaseModel,
    read,
    columns: dict[str, object],
    *,
    endpoints: dict[str, str] | None = None,
    force: bool = False,
) -> dict:
    """Skip a finished stage, else read ``cfg.input`` with ``read`` (a tuna_ray.data.readers
    function), keep ``columns`` (missing or null -> the given default) and ``run_stage``."""
    digest, finished = finished_manifest(cfg, cfg.output_dir, force=force)
    if finished is not None:
        return finished
    result = read(cfg.input.path, on_error=cfg.input.on_error, fmt=cfg.input.format)
    records = [
        {k: default if r.get(k) is None else r[k] for k, default in columns.items()}
        for r in result.records[: cfg.input.limit]
    ]
    return run_stage(
        spec,
        cfg,
        records,
        digest=digest,
        endpoints=endpoints,
        input_info=input_report(cfg.input, result, len(records)),
    )
