"""Probabilistic ranking, pure core: rank a teacher's samples by their mean token log-prob.

Stage: ranking (no Ray here; the Ray Data shell is ``tuna_ray.ranking.probabilistic_stage``). For one
instruction the teacher sampled N answers with the log-prob of every sampled token (METHOD.md,
"Probabilistic ranking"). Each answer's score is its mean token log-prob under the teacher,

    score_k = logprob_sum_k / num_tokens_k          (higher is better)

and the answers are sorted best-first (ties keep sampling order). Optionally the dataset's own
reference answer joins them, scored by the same teacher (the reference code mixed the original
Alpaca answers in).

Samples that carry no signal are handled by an explicit rule before ranking: an empty or
whitespace-only answer, or one identical (after stripping) to an earlier one, is dropped and
counted; with ``on_bad_sample="resample"`` the stage asks the teacher for replacements first.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from tuna_ray.engines.base import Sample, SamplingParams, Scored


@dataclass
class Candidate:
    text: str
    logprob_sum: float
    num_tokens: int
    origin: str  # "sample" | "reference"

    @property
    def score(self) -> float:
        return self.logprob_sum / self.num_tokens


@dataclass
class CleanResult:
    kept: list[Candidate]
    dropped: Counter = field(default_factory=Counter)  # reason -> count


def clean_samples(samples: list[Sample], seen: set[str] | None = None) -> CleanResult:
    """Drop empty, duplicate, and token-less samples (counted by reason), keep order.

    ``seen`` holds texts already kept for this instruction (earlier rounds); it is updated.
    """
    seen = set() if seen is None else seen
    out = CleanResult(kept=[])
    for s in samples:
        key = s.text.strip()
        if not key:
            out.dropped["empty"] += 1
        elif key in seen:
            out.dropped["duplicate"] += 1
        elif s.num_tokens == 0:
            out.dropped["no_tokens"] += 1
        else:
            seen.add(key)
            out.kept.append(Candidate(s.text, s.logprob_sum, s.num_tokens, "sample"))
    return out


def reference_candidate(text: str, scored: Scored) -> Candidate | None:
    """The dataset's reference answer as a candidate, or None when it has no tokens."""
    if not text.strip() or scored.num_tokens == 0:
        return None
    return Candidate(text, scored.logprob_sum, scored.num_tokens, "reference")


def rank_by_teacher_logprob(
    record: dict,
    prompt: str,
    candidates: list[Candidate],
    *,
    generator: str,
    params: SamplingParams,
) -> dict:
    """The ranked record (DESIGN.md schema) for ``record`` from its scored candidates."""
    ordered = sorted(candidates, key=lambda c: -c.score)  # stable: ties keep sampling order
    return {
        "id": record["id"],
        "instruction": record.get("instruction"),
        "input": record.get("input") or "",
        "prompt": prompt,
        "responses": [c.text for c in ordered],
        "scores": [c.score for c in ordered],
        "logprob_sums": [c.logprob_sum for c in ordered],
        "num_tokens": [c.num_tokens for c in ordered],
        "origins": [c.origin for c in ordered],
        "ranking": "probabilistic",
        "generator": json.dumps(
            {"engine": generator, **params.model_dump(mode="json")}, sort_keys=True
        ),
        "source": record.get("source"),
    }
