"""Ray Data shell of the probabilistic ranking stage: instructions -> ranked records.

    tuna-ray rank-probabilistic --config jobs/configs/<name>.yaml

Rows flow through ``TeacherRanker`` actors (``scaling.actors`` of them, each with its own
engine), driven by ``tuna_ray.ranking.runner.run_stage`` (resume by id, skip when finished,
fail when too many records failed). The UDF is async: an actor works on several batches at once
(runner.batches_in_flight), so one slow request never idles it, and inside a batch every
round of requests goes out for all its records together:

1. one ``sample`` call for the batch;
2. per resampling round, one ``sample`` call per number of missing samples, all concurrently,
   for the records with empty or duplicate samples;
3. with ``scoring: echo`` (always with ``include_reference``), every record's candidates are
   re-read by the teacher, all records' ``score`` calls concurrently.

The openai engine keeps at most ``max_concurrency`` of these requests in flight per actor,
whatever the number of batches; other engines run one call at a time in a worker thread.

UDF input columns: id, instruction, input, reference, source.
UDF output columns: id, status ("ok" | "failed"), reason, dropped_empty, dropped_duplicate,
dropped_no_tokens, resampled, plus usage deltas (requests, cached, prompt_tokens,
completion_tokens, cost_usd, retries) on the first row of each batch.
"""

from __future__ import annotations

import asyncio

import numpy as np

from tuna_ray.config import ProbabilisticStageConfig
from tuna_ray.engines.base import Prompt
from tuna_ray.ranking.probabilistic import TeacherCandidates, rank_by_teacher_logprob
from tuna_ray.ranking.runner import (
    EngineUDF,
    StageSpec,
    build_prompt,
    run_from_config,
)


class TeacherRanker(EngineUDF):
    """Ray Data UDF: sample N per instruction from the teacher, rank, write a part."""

    config_model = ProbabilisticStageConfig

    async def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        cfg = self.cfg
        rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["id"]))]
        prompts = [build_prompt(r, cfg.template, self.tokenizer, cfg.system_prompt) for r in rows]
        states = [TeacherCandidates(want=cfg.sampling.n) for _ in rows]
        for state, result in zip(states, await self.call_engine("sample", prompts, cfg.sampling)):
            state.add(result)
        for round_ in range(cfg.resample_rounds if cfg.on_bad_sample == "resample" else 0):
            if not await self._resample(prompts, states, round_):
                break
        references = [
            str(r.get("reference") or "") if cfg.include_reference else None for r in rows
        ]
        if cfg.score_by_echo:
            await self._rescore(prompts, states, references)
        records, failures, summary = [], [], []
        for row, prompt, state in zip(rows, prompts, states):
            candidates, reason = state.outcome(cfg.min_candidates)
            if candidates is not None:
                records.append(self._record(row, prompt, candidates))
            else:
                failures.append({"id": row["id"], "reason": reason, "stage": "rank_probabilistic"})
            summary.append(
                {
                    "id": row["id"],
                    "status": "ok" if candidates is not None else "failed",
                    "reason": reason or "",
                    **{
                        f"dropped_{k}": state.dropped[k]
                        for k in ("empty", "duplicate", "no_tokens")
                    },
                    "resampled": state.resampled,
                }
            )
        return await asyncio.to_thread(self.finish, records, failures, summary)

    async def _resample(self, prompts: list[Prompt], states, round_: int) -> bool:
        """Ask for the missing samples of every record that lacks some: one call per count."""
        by_count: dict[int, list[int]] = {}
        for i, state in enumerate(states):
            if state.missing:
                by_count.setdefault(state.missing, []).append(i)
        if not by_count:
            return False
        seed = self.cfg.sampling.seed
        params = self.cfg.sampling.model_copy(
            update={"seed": None if seed is None else seed + 1000 * (round_ + 1)}
        )
        calls = [
            self.call_engine(
                "sample", [prompts[i] for i in ids], params.model_copy(update={"n": n})
            )
            for n, ids in by_count.items()
        ]
        for (n, ids), results in zip(by_count.items(), await asyncio.gather(*calls)):
            for i, result in zip(ids, results):
                states[i].add(result, replacing=n)
        return True

    async def _rescore(self, prompts: list[Prompt], states, references) -> None:
        """The teacher re-reads every record's candidates after its prompt, all at once."""
        todo = [i for i, state in enumerate(states) if not state.error]
        calls = [
            self.call_engine("score", prompts[i], states[i].texts_to_score(references[i]))
            for i in todo
        ]
        for i, scored in zip(todo, await asyncio.gather(*calls)):
            states[i].rescore(references[i], scored)

    def _record(self, row: dict, prompt: Prompt, candidates) -> dict:
        text = prompt.text if prompt.text is not None else prompt.messages[-1]["content"]
        return rank_by_teacher_logprob(
            row,
            text,
            candidates,
            generator=self.engine.name,
            params=self.cfg.sampling,
            scoring="echo" if self.cfg.score_by_echo else "sampled",
        )


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
