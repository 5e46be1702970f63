"""Ray Data shell of the probabilistic ranking stage: instructions -> ranked records.

    tuna-ray rank-probabilistic --config jobs/configs/<name>.yaml

Rows flow through ``TeacherRanker`` actors (``scaling.actors`` of them, each with its own
engine); every actor batch is written durably as a Parquet part before the next one starts
(``tuna_ray.data.parts``), so a crash loses at most the batches in flight and a rerun only asks
the teacher about ids without a result. A finished stage (manifest with the same config hash)
is skipped. The per-row summary each actor returns is what the driver counts for the report.

UDF input columns: id, instruction, input, reference, source.
UDF output columns: id, status ("ok" | "failed"), reason, dropped_empty, dropped_duplicate,
dropped_no_tokens, resampled, plus usage deltas (requests, cached, prompt_tokens,
completion_tokens, cost_usd, retries) on the first row of each batch.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import numpy as np

from tuna_ray.config import ProbabilisticStageConfig, config_hash
from tuna_ray.data import parts
from tuna_ray.data.templates import render_prompt
from tuna_ray.engines.base import EngineError, Prompt, SamplingParams
from tuna_ray.ranking.probabilistic import (
    clean_samples,
    rank_by_teacher_logprob,
    reference_candidate,
)

log = logging.getLogger(__name__)
USAGE_FIELDS = ("requests", "cached", "prompt_tokens", "completion_tokens", "cost_usd", "retries")


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


class TeacherRanker:
    """Ray Data UDF: sample N per instruction from the teacher, rank, write a part."""

    def __init__(self, config_json: str):
        from tuna_ray.engines.factory import build_engine

        self.cfg = ProbabilisticStageConfig.model_validate_json(config_json)
        self.engine = build_engine(self.cfg.engine)
        self.params = SamplingParams(**self.cfg.sampling.model_dump())
        self.tokenizer = getattr(self.engine, "tokenizer", None)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        cfg = self.cfg
        usage_before = self.engine.usage()
        rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["id"]))]
        prompts = [build_prompt(r, cfg.template, self.tokenizer, cfg.system_prompt) for r in rows]
        first = self.engine.sample(prompts, self.params)
        records, failures, summary = [], [], []
        for row, prompt, result in zip(rows, prompts, first):
            counts: Counter = Counter()
            ranked, reason = self._rank_one(row, prompt, result, counts)
            if ranked is not None:
                records.append(ranked)
            else:
                failures.append({"id": row["id"], "reason": reason, "stage": "rank_probabilistic"})
            summary.append(
                {
                    "id": row["id"],
                    "status": "ok" if ranked else "failed",
                    "reason": reason or "",
                    **{f"dropped_{k}": counts[k] for k in ("empty", "duplicate", "no_tokens")},
                    "resampled": counts["resampled"],
                }
            )
        parts.write_part(cfg.output_dir, records, failures)
        usage_after = self.engine.usage()
        out = {k: [s[k] for s in summary] for k in summary[0]}
        for name in USAGE_FIELDS:
            delta = getattr(usage_after, name) - getattr(usage_before, name)
            out[name] = [delta] + [0] * (len(summary) - 1)
        return out

    def _rank_one(self, row, prompt, result, counts: Counter):
        """(ranked record, None) or (None, failure reason)."""
        cfg = self.cfg
        if isinstance(result, EngineError):
            return None, result.reason
        seen: set[str] = set()
        cleaned = clean_samples(result, seen)
        candidates, dropped = cleaned.kept, cleaned.dropped
        for round_ in range(cfg.resample_rounds if cfg.on_bad_sample == "resample" else 0):
            missing = self.params.n - len(candidates)
            if missing <= 0:
                break
            counts["resampled"] += missing
            seed = None if self.params.seed is None else self.params.seed + 1000 * (round_ + 1)
            more = self.engine.sample(
                [prompt], self.params.model_copy(update={"n": missing, "seed": seed})
            )[0]
            if isinstance(more, EngineError):
                return None, more.reason
            extra = clean_samples(more, seen)
            candidates += extra.kept
            dropped += extra.dropped
        counts.update(dropped)
        reference = row.get("reference")
        if cfg.include_reference and reference and str(reference).strip():
            scored = self.engine.score(prompt, [str(reference)])
            if isinstance(scored, EngineError):
                return None, f"reference scoring: {scored.reason}"
            ref = reference_candidate(str(reference), scored[0])
            if ref is not None:
                candidates.append(ref)
        if len(candidates) < cfg.min_candidates:
            return None, (
                f"too few usable samples: {len(candidates)} < {cfg.min_candidates} "
                f"(dropped {dict(dropped)})"
            )
        text = prompt.text if prompt.text is not None else prompt.messages[-1]["content"]
        return rank_by_teacher_logprob(
            row, text, candidates, generator=self.engine.name, params=self.params
        ), None


def run_probabilistic(cfg: ProbabilisticStageConfig) -> dict:
    """Run (or resume, or skip) the stage; return its report (also written as manifest.json)."""
    import ray.data

    from tuna_ray.data.readers import read_instructions
    from tuna_ray.ray_setup import ensure_ray

    digest = config_hash(cfg.model_dump(mode="json", exclude={"scaling"}))
    manifest = parts.read_manifest(cfg.output_dir)
    if manifest is not None and manifest.get("config_hash") == digest and not cfg.retry_failed:
        log.info("%s: finished with this config, skipping", cfg.output_dir)
        return manifest
    started = time.time()
    read = read_instructions(cfg.input.path, on_error=cfg.input.on_error, fmt=cfg.input.format)
    records = read.records[: cfg.input.limit]
    order = [r["id"] for r in records]
    done = parts.finished_ids(cfg.output_dir)
    todo = [r for r in records if r["id"] not in done]
    log.info(
        "rank-probabilistic: %d instructions, %d done before, %d to do",
        len(records),
        len(done & set(order)),
        len(todo),
    )
    totals: Counter = Counter()
    if todo:
        ensure_ray(cfg.scaling.ray_address)
        items = [
            {
                "id": r["id"],
                "instruction": r["instruction"],
                "input": r.get("input") or "",
                "reference": r.get("reference") or "",
                "source": r.get("source") or "",
            }
            for r in todo
        ]
        ds = ray.data.from_items(items).map_batches(
            TeacherRanker,
            fn_constructor_kwargs={"config_json": cfg.model_dump_json()},
            batch_size=cfg.scaling.batch_size,
            compute=ray.data.ActorPoolStrategy(size=cfg.scaling.actors),
            num_cpus=cfg.scaling.cpus_per_actor,
            num_gpus=cfg.scaling.gpus_per_actor,
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            totals["ok"] += int((batch["status"] == "ok").sum())
            totals["failed_this_run"] += int((batch["status"] == "failed").sum())
            for key in (
                "dropped_empty",
                "dropped_duplicate",
                "dropped_no_tokens",
                "resampled",
                *USAGE_FIELDS,
            ):
                totals[key] += float(batch[key].sum())
    path, ranked, failed = parts.consolidate(cfg.output_dir, "ranked", order)
    report = {
        "stage": "rank_probabilistic",
        "config_hash": digest,
        "output": path,
        "input": {
            "path": cfg.input.path,
            "read": read.num_read,
            "used": len(records),
            "skipped": dict(read.skipped),
            "skipped_examples": [str(e) for e in read.errors[:20]],
        },
        "counts": {
            "ranked": len(ranked),
            "failed": len(failed),
            "done_before": len(done),
            "failure_reasons": dict(Counter(f["reason"].split(":")[0] for f in failed)),
        },
        "samples": {
            k: int(totals[k])
            for k in ("dropped_empty", "dropped_duplicate", "dropped_no_tokens", "resampled")
        },
        "usage_this_run": {k: totals[k] for k in USAGE_FIELDS},
        "wall_time_s": round(time.time() - started, 1),
    }
    parts.write_manifest(cfg.output_dir, report)
    return report
