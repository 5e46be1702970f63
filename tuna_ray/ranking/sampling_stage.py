"""Ray Data shell of student sampling: instructions -> N diverse candidate answers each.

    tuna-ray sample --config jobs/configs/<name>.yaml

``StudentSampler`` actors (each with its own engine: ``hf`` on CPU/GPU, or ``openai`` against
any OpenAI-compatible server of the student, e.g. vLLM or Ray Serve LLM) sample N answers per
instruction; instructions whose samples are too similar (any pair with ROUGE-L F1 >= the
threshold) are sampled again at a higher temperature, all open instructions of a batch in one
engine call per trial (tuna_ray.ranking.diversity). Driven by ``runner.run_stage``.

UDF input columns: id, instruction, input, source, reference.
Output records (``candidates.parquet``): id, instruction, input, prompt, responses[N],
logprob_sums, num_tokens, generator, trials, kept_trial, temperatures, mean_rouge_l,
max_rouge_l, source, reference (the dataset's answer, passed on to contextual ranking). UDF summary columns: id, status, reason, trials, resampled_instructions,
dropped_empty (+ usage).
"""

from __future__ import annotations

import json

import numpy as np

from tuna_ray.config import SamplingStageConfig
from tuna_ray.engines.base import EngineError
from tuna_ray.ranking.diversity import DiversityTracker, trial_temperature
from tuna_ray.ranking.runner import (
    EngineUDF,
    StageSpec,
    build_prompt,
    run_from_config,
)


class StudentSampler(EngineUDF):
    """Ray Data UDF: diverse samples for a batch of instructions, written as one part."""

    config_model = SamplingStageConfig

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        cfg, params = self.cfg, self.cfg.sampling
        usage_before = self.engine.usage()
        rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["id"]))]
        prompts = [build_prompt(r, cfg.template, self.tokenizer, cfg.system_prompt) for r in rows]
        trackers = [DiversityTracker(cfg.diversity_threshold, cfg.max_trials) for _ in rows]
        errors: dict[int, str] = {}
        for trial in range(cfg.max_trials):
            open_ = [i for i, t in enumerate(trackers) if not t.done and i not in errors]
            if not open_:
                break
            temperature = trial_temperature(params.temperature, trial, cfg.temperature_step)
            seed = None if params.seed is None else params.seed + trial
            results = self.engine.sample(
                [prompts[i] for i in open_],
                params.model_copy(update={"temperature": temperature, "seed": seed}),
            )
            for i, result in zip(open_, results):
                if isinstance(result, EngineError):
                    errors[i] = result.reason
                else:
                    trackers[i].add_trial(result, temperature)
        records, failures, summary = [], [], []
        for i, (row, prompt, t) in enumerate(zip(rows, prompts, trackers)):
            kept = [s for s in t.samples if s.text.strip()]
            reason = errors.get(i) if t.kept_trial == 0 else None
            if reason is None and len(kept) < 2:
                reason = f"too few non-empty samples: {len(kept)}"
            if reason is None:
                records.append(self._record(row, prompt, t, kept))
            else:
                failures.append({"id": row["id"], "reason": reason, "stage": "sample"})
            summary.append(
                {
                    "id": row["id"],
                    "status": "failed" if reason else "ok",
                    "reason": reason or "",
                    "trials": t.trials,
                    "resampled_instructions": int(t.trials > 1),
                    "dropped_empty": len(t.samples) - len(kept),
                }
            )
        return self.finish(records, failures, summary, usage_before)

    def _record(self, row, prompt, t: DiversityTracker, kept) -> dict:
        return {
            "id": row["id"],
            "instruction": row["instruction"],
            "input": row["input"],
            "prompt": prompt.text if prompt.text is not None else prompt.messages[-1]["content"],
            "responses": [s.text for s in kept],
            "logprob_sums": [s.logprob_sum for s in kept],
            "num_tokens": [s.num_tokens for s in kept],
            "generator": json.dumps(
                {"engine": self.engine.name, **self.cfg.sampling.model_dump(mode="json")},
                sort_keys=True,
            ),
            "trials": t.trials,
            "kept_trial": t.kept_trial,
            "temperatures": t.temperatures,
            "mean_rouge_l": t.mean_rouge_l,
            "max_rouge_l": t.max_rouge_l,
            "source": row.get("source") or None,
            # the dataset's own answer, for contextual ranking (``include_original``)
            "reference": row.get("reference") or None,
        }


SAMPLING = StageSpec(
    name="sample",
    output="candidates",
    udf=StudentSampler,
    count_fields=("trials", "resampled_instructions", "dropped_empty"),
)


def run_sampling(cfg: SamplingStageConfig, endpoints: dict[str, str] | None = None) -> dict:
    """Run (or resume, or skip) student sampling; return its manifest."""
    from tuna_ray.data.readers import read_instructions

    columns = {"id": None, "instruction": None, "input": "", "source": "", "reference": ""}
    return run_from_config(SAMPLING, cfg, read_instructions, columns, endpoints=endpoints)
