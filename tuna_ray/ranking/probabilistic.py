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

Comparable scores: every candidate of an instruction is scored the same way, as the mean raw
log-prob of its own tokens (EOS excluded) after the same prompt. ``scoring="sampled"`` takes the
log-probs the teacher returned with each sample; ``scoring="echo"`` re-reads every candidate
after the prompt text (``Engine.score``), which is the only way to score the reference answer,
so a reference joins only under ``echo`` (``TeacherCandidates`` collects one instruction's).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from tuna_ray.engines.base import EngineError, Sample, SamplingParams, Scored


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


@dataclass
class TeacherCandidates:
    """One instruction's candidates while the stage collects them, round by round.

    ``add`` takes a sampling result (samples, or the engine's error: the instruction fails);
    ``missing`` says how many replacements to ask for; ``rescore`` replaces every kept sample's
    log-probs with the teacher's re-reading and adds the reference; ``outcome`` is the
    candidates to rank, or the failure reason.
    """

    want: int  # samples asked for (N)
    kept: list[Candidate] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    dropped: Counter = field(default_factory=Counter)  # reason -> count
    resampled: int = 0
    error: str | None = None

    def add(self, result: list[Sample] | EngineError, *, replacing: int = 0) -> None:
        self.resampled += replacing
        if isinstance(result, EngineError):
            self.error = self.error or result.reason
            return
        cleaned = clean_samples(result, self.seen)
        self.kept += cleaned.kept
        self.dropped.update(cleaned.dropped)

    @property
    def missing(self) -> int:
        return 0 if self.error else max(0, self.want - len(self.kept))

    def texts_to_score(self, reference: str | None) -> list[str]:
        """What ``rescore`` needs scored, in order: the kept samples, then the reference."""
        return [c.text for c in self.kept] + ([reference] if _usable(reference) else [])

    def rescore(self, reference: str | None, scored: list[Scored] | EngineError) -> None:
        """Score every candidate from ``scored`` (for ``texts_to_score(reference)``)."""
        if isinstance(scored, EngineError):
            self.error = self.error or f"scoring: {scored.reason}"
            return
        if len(scored) != len(self.texts_to_score(reference)):
            self.error = self.error or f"scoring: {len(scored)} scores for {len(self.kept)} texts"
            return
        rescored = []
        for c, s in zip(self.kept, scored):
            if s.num_tokens == 0:
                self.dropped["no_tokens"] += 1
            else:
                rescored.append(Candidate(c.text, s.logprob_sum, s.num_tokens, c.origin))
        self.kept = rescored
        if _usable(reference):
            ref = reference_candidate(reference, scored[-1])
            if ref is not None:
                self.kept.append(ref)

    def outcome(self, min_candidates: int) -> tuple[list[Candidate] | None, str | None]:
        """(candidates, None) or (None, why this instruction failed)."""
        if self.error:
            return None, self.error
        if len(self.kept) < min_candidates:
            return None, (
                f"too few usable samples: {len(self.kept)} < {min_candidates} "
                f"(dropped {dict(self.dropped)})"
            )
        return self.kept, None


def _usable(reference: str | None) -> bool:
    return bool(reference and reference.strip())


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
    scoring: str = "sampled",
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
            {"engine": generator, "scoring": scoring, **params.model_dump(mode="json")},
            sort_keys=True,
        ),
        "source": record.get("source"),
    }
