"""Student sampling, pure core: N samples per instruction, resampled until they differ.

Stage: ranking (contextual). METHOD.md: if any two of the N samples have ROUGE-L F1 >= 0.8
(rouge-score, stemming on), sample again with temperature + 0.1, at most 3 trials in all, and
keep the trial with the lowest mean pairwise ROUGE-L.

``DiversityTracker`` follows one instruction through its trials; the stage shell batches the
instructions still open into one engine call per trial.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from itertools import combinations

from tuna_ray.engines.base import Sample


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def pairwise_rouge_l(texts: list[str]) -> list[float]:
    """ROUGE-L F1 of every unordered pair (i < j), in ``itertools.combinations`` order."""
    scorer = _scorer()
    return [scorer.score(a, b)["rougeL"].fmeasure for a, b in combinations(texts, 2)]


def trial_temperature(base: float, trial: int, step: float) -> float:
    """Temperature of 0-based ``trial``: base + trial * step."""
    return round(base + trial * step, 6)


@dataclass
class DiversityTracker:
    """The trials of one instruction; ``done`` once diverse enough or out of trials."""

    threshold: float = 0.8
    max_trials: int = 3
    samples: list[Sample] = field(default_factory=list)  # of the kept (most diverse) trial
    kept_trial: int = 0  # 1-based; 0 = no trial yet
    mean_rouge_l: float = float("inf")
    max_rouge_l: float = float("inf")
    temperatures: list[float] = field(default_factory=list)
    done: bool = False

    @property
    def trials(self) -> int:
        return len(self.temperatures)

    def add_trial(self, samples: list[Sample], temperature: float) -> bool:
        """Record one trial's samples; return ``done``."""
        self.temperatures.append(temperature)
        rouge = pairwise_rouge_l([s.text for s in samples]) or [0.0]
        mean, top = sum(rouge) / len(rouge), max(rouge)
        if mean < self.mean_rouge_l:
            self.samples, self.kept_trial = samples, self.trials
            self.mean_rouge_l, self.max_rouge_l = mean, top
        self.done = top < self.threshold or self.trials >= self.max_trials
        return self.done
