"""Model x task comparison tables (markdown) from one or more evaluation results.

Stage: eval (pure). ``render_comparison`` takes results as ``run_eval`` returns them (or the
paths of their ``results.json`` files: one-model files, or several-model files, which are
expanded) and renders:

1. one row per model, one column per task: the task's main number with its bootstrap interval,
   all in percent (win rate, ROUGE-L x 100, agreement x 100);
2. a details table per task kind: pairwise (win rate, length-controlled win rate, wins / ties /
   losses, average answer lengths beside the reference's, judge), ROUGE-L (exact match,
   instances, missing predictions), ranking agreement (the length-only baseline, pairs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from tuna_ray import storage

MAIN_METRIC = {  # kind -> (label, key, scale to percent)
    "pairwise_judge": ("win rate %", "win_rate", 1.0),
    "rouge_l": ("ROUGE-L", "rouge_l", 1.0),
    "ranking_agreement": ("agreement %", "agreement", 100.0),
}


def load_results(source: str | dict) -> list[dict]:
    """One-model results (``{"model", "tasks"}``) from a results dict or results.json path."""
    results = storage.read_json(source) if isinstance(source, str) else source
    if "models" in results:
        return list(results["models"].values())
    if "tasks" not in results:
        raise ValueError(f"{source if isinstance(source, str) else 'results'}: no 'tasks'")
    return [results]


def _num(value, scale: float = 1.0, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value * scale:.{digits}f}"


def _ci(interval, scale: float = 1.0) -> str:
    if not interval or any(v is None for v in interval):
        return ""
    return f" [{_num(interval[0], scale)}, {_num(interval[1], scale)}]"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _table(header: Sequence[str], rows: list[Sequence[str]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


def _label(model: dict) -> str:
    return model.get("model", {}).get("label") or model.get("model", {}).get("name_or_path", "?")


def render_comparison(results: Sequence[str | dict], *, title: str = "Evaluation") -> str:
    """The markdown comparison of every model in ``results`` (module docstring)."""
    models = [m for source in results for m in load_results(source)]
    tasks: dict[str, str] = {}  # name -> kind, in order of first appearance
    for m in models:
        for name, res in m["tasks"].items():
            tasks.setdefault(name, res.get("kind", ""))
    level = next(
        (t.get("ci_level") for m in models for t in m["tasks"].values() if t.get("ci_level")),
        None,
    )
    lines = [f"# {title}", ""]
    header = ["model"] + [
        f"{n}: {MAIN_METRIC.get(k, ('value', '', 1))[0]}" for n, k in tasks.items()
    ]
    rows = []
    for m in models:
        cells = [_label(m)]
        for name, kind in tasks.items():
            res = m["tasks"].get(name)
            if res is None:
                cells.append("–")
                continue
            _, key, scale = MAIN_METRIC.get(kind, ("", "value", 1.0))
            cells.append(_num(res.get(key, res.get("value")), scale) + _ci(res.get("ci"), scale))
        rows.append(cells)
    lines += _table(header, rows)
    lines += ["", f"Brackets: bootstrap {int(100 * (level or 0.95))}% interval over items.", ""]

    details = {
        "pairwise_judge": (_PAIRWISE_HEAD, _pairwise_cells),
        "rouge_l": (_ROUGE_HEAD, _rouge_cells),
        "ranking_agreement": (_AGREEMENT_HEAD, _agreement_cells),
    }
    for kind, (head, cells) in details.items():
        rows = [
            cells(m, name, m["tasks"][name])
            for name, k in tasks.items()
            if k == kind
            for m in models
            if name in m["tasks"]
        ]
        if rows:
            lines += [f"## {kind}", "", *_table(head, rows), ""]
    return "\n".join(lines)


_PAIRWISE_HEAD = (
    "model", "task", "win rate %", "LC win rate %", "W / T / L", "n",
    "avg length (model / ref)", "reference", "judge",
)  # fmt: skip
_ROUGE_HEAD = ("model", "task", "ROUGE-L", "exact match", "instances", "tasks", "missing")
_AGREEMENT_HEAD = ("model", "task", "agreement %", "length baseline %", "pairs", "records")


def _pairwise_cells(model: dict, name: str, r: dict) -> list[str]:
    lengths = f"{_num(r.get('avg_length'), digits=0)} / "
    lengths += _num(r.get("reference_avg_length"), digits=0)
    return [
        _label(model),
        name,
        _num(r.get("win_rate")) + _ci(r.get("ci")),
        _num(r.get("lc_win_rate")) + _ci(r.get("lc_ci")),
        f"{r.get('wins', 0)} / {r.get('ties', 0)} / {r.get('losses', 0)}",
        str(r.get("n", 0)),
        lengths,
        str((r.get("data") or {}).get("reference") or "–"),
        _judge(r),
    ]


def _rouge_cells(model: dict, name: str, r: dict) -> list[str]:
    return [
        _label(model),
        name,
        _num(r.get("rouge_l")) + _ci(r.get("ci")),
        _num(r.get("exact_match")),
        str(r.get("n", 0)),
        str(r.get("tasks", 0)),
        str(r.get("missing", 0)),
    ]


def _agreement_cells(model: dict, name: str, r: dict) -> list[str]:
    return [
        _label(model),
        name,
        _num(r.get("agreement"), 100) + _ci(r.get("ci"), 100),
        _num(r.get("length_baseline"), 100) + _ci(r.get("length_baseline_ci"), 100),
        str(r.get("pairs", 0)),
        str(r.get("records", 0)),
    ]


def _judge(result: dict) -> str:
    judge = result.get("judge") or {}
    engine = judge.get("engine") or {}
    return (
        f"{engine.get('model', '?')} ({judge.get('template', '?')}, {judge.get('aggregate', '?')})"
    )
