"""Ray Data shell of the probabilistic ranking stage: instructions -> ranked records.

    tuna-ray rank-probabilistic --config jobs/configs/<name>.yaml

Rows flow through ``TeacherRanker`` actors (``scaling.actors`` of them, each with its own
engine), driven by ``tuna_ray.ranking.runner.run_stage`` (resume by id, skip when finished).

UDF input columns: id, instruction, input, reference, source.
UDF output columns: id, status ("ok" | "failed"), reason, dropped_empty, dropped_duplicate,
dropped_no_tokens, resampled, plus usage deltas (requests, cached, prompt_tokens,
completion_tokens, cost_usd, retries) on the first row of each batch.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from tuna_ray.config import ProbabilisticStageConfig
from tuna_ray.engines.base import EngineError
from tuna_ray.ranking.probabilistic import (
    clean_samples,
    rank_by_teacher_logprob,
    reference_candidate,
)
from tuna_ray.ranking.runner import (
    EngineUDF,
    StageSpec,
    build_prompt,
    run_from_config,
)


class TeacherRanker(EngineUDF):
    """Ray Data UDF: sample N per instruction from the teacher, rank, write a part."""

    config_model = ProbabilisticStageConfig

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        cfg = self.cfg
        usage_before = self.engine.usage()
        rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["id"]))]
        prompts = [build_prompt(r, cfg.template, self.tokenizer, cfg.system_prompt) for r in rows]
        first = self.engine.sample(prompts, self.cfg.sampling)
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
        return self.finish(records, failures, summary, usage_before)

    def _rank_one(self, row, prompt, result, counts: Counter):
        """(ranked record, None) or (None, failure reason)."""
        cfg = self.cfg
        if isinstance(result, EngineError):
            return None, result.reason
        seen: set[str] = set()
        cleaned = clean_samples(result, seen)
        candidates, dropped = cleaned.kept, cleaned.dropped
        for round_ in range(cfg.resample_rounds if cfg.on_bad_sample == "resample" else 0):
            missing = self.cfg.sampling.n - len(candidates)
            if missing <= 0:
                break
            counts["resampled"] += missing
            seed = (
                None
                if self.cfg.sampling.seed is None
                else self.cfg.sampling.seed + 1000 * (round_ + 1)
            )
            more = self.engine.sample(
                [prompt], self.cfg.sampling.model_copy(update={"n": missing, "seed": seed})
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
            row, text, candidates, generator=self.engine.name, params=self.cfg.sampling
        ), None


def run_probabilistic(
    cfg: ProbabilisticStageConfig, endpoints: dict[str, str] | None = None
) -> dict:
    """Run (or resume, or skip) the stage; return its report (also written as manifest.json)."""
    from tuna_ray.data.readers import read_instructions

    columns = {"id": None, "instruction": None, "input": "", "reference": "", "source": ""}
    return run_from_config(
        PROBABILISTIC, cfg, read_instructions, columns, endpoints=endpoints, force=cfg.retry_failed
    )


PROBABILISTIC = StageSpec(
    name="rank_probabilistic",
    output="ranked",
    udf=TeacherRanker,
    count_fields=("dropped_empty", "dropped_duplicate", "dropped_no_tokens", "resampled"),
)
