"""Super-NaturalInstructions ROUGE-L and exact match, pure core (task files, prompts, scoring).

Stage: eval (no Ray here). Reads the official task format of allenai/natural-instructions
(``tasks/<task>.json``: ``Definition`` (a list of strings, or one string), ``Categories``,
``Positive Examples``, ``Instances: [{id, input, output: [references]}]``); the data is not
shipped, a user points at a clone.

Faithful to the official evaluation (natural-instructions ``eval/automatic/evaluation.py``, the
default English track, which is Tk-Instruct's ``compute_metrics.py``):

- ROUGE-L: ``rouge_score.rouge_scorer.RougeScorer(['rougeL'], use_stemmer=True)`` with its
  default tokenizer (lower-case, every non-[a-z0-9] character to a space, Porter stemming of
  tokens longer than 3 characters), F-measure;
- exact match: both texts lower-cased, every ``string.punctuation`` character removed,
  whitespace collapsed to single spaces, then compared (articles are *not* removed: the
  official code keeps SQuAD's normaliser without ``remove_articles``);
- per instance the maximum over its references; a missing prediction is ``""``; reported as
  100 x the mean over all instances (the official overall score), also per task and per
  category; the first ``instances_per_task`` instances of each task (the official test set
  puts its 100 evaluation instances first: ``create_reference_file.py``).

The zero-shot prompt is Tk-Instruct's definition-only encoding (its ``ni_collator``): a
definition or input that does not end in punctuation gets a ".":
``"Definition: {definition}\\n\\nNow complete the following example -\\nInput: {input}\\nOutput: "``.
"""

from __future__ import annotations

import json
import math
import string
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from tuna_ray.eval.stats import bootstrap_ci

_PUNCTUATION = frozenset(string.punctuation)


class SuperNIError(ValueError):
    """A task file that cannot be used; says which file and what is wrong."""


@dataclass(frozen=True)
class SuperNITask:
    name: str
    definition: str
    category: str | None
    instances: tuple[dict, ...]  # {"id", "input", "references"}


def load_task(path: str | Path, instances: int | None = None) -> SuperNITask:
    """One ``tasks/<name>.json`` file, keeping its first ``instances`` instances."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SuperNIError(f"{path}: cannot read the task file: {exc}") from exc
    definition = data.get("Definition")
    if isinstance(definition, list):
        definition = definition[0] if definition else None
    if not isinstance(definition, str) or not definition.strip():
        raise SuperNIError(f"{path}: no 'Definition' text")
    raw = data.get("Instances")
    if not isinstance(raw, list) or not raw:
        raise SuperNIError(f"{path}: no 'Instances' list")
    kept = []
    for k, inst in enumerate(raw[:instances]):
        refs = inst.get("output") if isinstance(inst, dict) else None
        if isinstance(refs, str):
            refs = [refs]
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise SuperNIError(f"{path}: instance {k} needs 'output', a list of strings")
        if not isinstance(inst.get("input"), str):
            raise SuperNIError(f"{path}: instance {k} needs an 'input' string")
        kept.append(
            {
                "id": str(inst.get("id") or f"{path.stem}-{k}"),
                "input": inst["input"],
                "references": list(refs),
            }
        )
    categories = data.get("Categories") or [None]
    return SuperNITask(path.stem, definition, categories[0], tuple(kept))


def zero_shot_prompt(definition: str, input: str) -> str:
    """Tk-Instruct's definition-only prompt (module docstring).

    >>> zero_shot_prompt("Add the numbers", "2 3")
    'Definition: Add the numbers.\\n\\nNow complete the following example -\\nInput: 2 3.\\nOutput: '
    """
    text = "Definition: " + definition.strip()
    if text[-1] not in string.punctuation:
        text += "."
    text += "\n\nNow complete the following example -\nInput: " + input.strip()
    if text[-1] not in string.punctuation:
        text += "."
    return text + "\nOutput: "


def normalize_answer(text: str) -> str:
    """Lower-case, drop ``string.punctuation``, collapse whitespace (articles stay).

    >>> normalize_answer("  The Cat's   hat!  ")
    'the cats hat'
    """
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


@cache
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure with the official settings (module docstring)."""
    return _scorer().score(reference, prediction)["rougeL"].fmeasure


def score_instance(prediction: str, references: Sequence[str]) -> tuple[float, bool]:
    """(max ROUGE-L, any exact match) over the instance's references."""
    return (
        max(rouge_l(prediction, r) for r in references),
        any(exact_match(prediction, r) for r in references),
    )


def score_super_ni(
    instances: Sequence[dict],
    predictions: dict[str, str],
    *,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Scores of ``predictions`` (id -> text) on ``instances`` ({"id", "task", "references",
    optional "category"}): ``rouge_l`` and ``exact_match`` (100 x mean over instances), the
    ROUGE-L bootstrap ``ci``, ``per_task`` and ``per_category`` means, ``missing`` (instances
    scored with an empty prediction)."""
    rows = []
    for inst in instances:
        r, em = score_instance(predictions.get(inst["id"], ""), inst["references"])
        rows.append((inst, 100.0 * r, 100.0 * em))
    if not rows:
        nan = math.nan
        return {"metric": "rouge_l", "value": nan, "rouge_l": nan, "ci": [nan, nan], "n": 0}

    def means(group: list[tuple]) -> dict:
        return {
            "rouge_l": sum(r for _, r, _ in group) / len(group),
            "exact_match": sum(e for _, _, e in group) / len(group),
            "n": len(group),
        }

    by_task, by_category = defaultdict(list), defaultdict(list)
    for row in rows:
        by_task[row[0]["task"]].append(row)
        if row[0].get("category"):
            by_category[row[0]["category"]].append(row)
    overall = means(rows)
    lo, hi = bootstrap_ci([r for _, r, _ in rows], resamples=resamples, seed=seed, level=level)
    return {
        "metric": "rouge_l",
        "value": overall["rouge_l"],
        **overall,
        "ci": [lo, hi],
        "tasks": len(by_task),
        "missing": sum(inst["id"] not in predictions for inst in instances),
        "per_task": {t: means(g) for t, g in sorted(by_task.items())},
        "per_category": {c: means(g) for c, g in sorted(by_category.items())},
    }
