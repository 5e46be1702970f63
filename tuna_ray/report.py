"""Run report: one Markdown page, with PNG plots, of what every pipeline stage did.

Stage: pipeline (called at the end of ``tuna-ray run``, and after a failure with the stages
that got that far). It only reads what the stages left behind -- ``train_report.json`` and
``metrics/*.jsonl`` of a training stage, ``manifest.json`` and the consolidated Parquet of a
generation stage -- and writes

    <run_dir>/report.md            summary table, then one section per stage
    <run_dir>/report/<name>.png    plots, linked from report.md as ``report/<name>.png``

A missing file or field shows as "n/a": the report is written after failures too, so it must
never raise over a half-finished run.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from tuna_ray import storage
from tuna_ray.tracking import read_metrics

log = logging.getLogger(__name__)

NA = "n/a"
# The consolidated output of each generation stage (its manifest counts it under this name).
OUTPUT_NAME = {"rank_probabilistic": "ranked", "rank_contextual": "ranked", "sample": "candidates"}
USAGE_COLUMNS = ("prompt_tokens", "completion_tokens", "cost_usd")


def write_run_report(run_dir: str, stages: list[dict], notes: list[str] | None = None) -> str:
    """Write ``<run_dir>/report.md`` (+ ``report/*.png``) for ``stages``; return its path.

    Each stage is ``{"name", "kind", "status", "output_dir", "report", "wall_time_s",
    "error"}`` (``wall_time_s``: over every attempt; tuna_ray.pipeline.runlog); a missing ``report`` is
    read from the stage's output directory. ``notes`` (what stood in for what) come first;
    then the evaluation's comparison table, when the run has one, then the summary.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes; set here so importing us stays cheap
    stages = [
        {**s, "name": s.get("name") or f"stage_{i}", "report": s.get("report") or _load_report(s)}
        for i, s in enumerate(stages)
    ]
    lines = [f"# Run report: `{run_dir}`", ""]
    if notes:
        lines += ["**Read first.** " + " ".join(notes), ""]
    with tempfile.TemporaryDirectory() as tmp:
        evaluation = next((s for s in stages if s.get("kind") == "eval" and s["report"]), None)
        if evaluation is not None:
            lines += _evaluation_section(evaluation, Path(tmp))
        lines += ["## Summary", "", *_summary(stages), ""]
        for stage in stages:
            if stage.get("kind") != "eval":
                lines += _stage_section(stage, Path(tmp))  # each section ends with a blank line
        if any(Path(tmp).iterdir()):
            storage.upload_dir(tmp, storage.join(run_dir, "report"))
    path = storage.join(run_dir, "report.md")
    storage.write_text(path, "\n".join(lines))
    return path


def _evaluation_section(stage: dict, plot_dir: Path) -> list[str]:
    """The models compared on the run's evaluation tasks (tuna_ray.eval), and a plot of it."""
    from tuna_ray.eval import render_comparison

    results = stage["report"]
    by_label = results.get("models") or {}
    # the run's order: where it started, then each trained model (results.json sorts keys)
    order = ["start", "tuna_p", "tuna_c", "tuna"]
    labels = sorted(by_label, key=lambda k: (order.index(k) if k in order else len(order), k))
    per_model = [by_label[k] for k in labels] or [results]
    table = render_comparison(per_model, title="Evaluation: did Tuna make the model better?")
    return [*table_lines(table), "", *_evaluation_plot(plot_dir, per_model)]


def table_lines(markdown: str) -> list[str]:
    """``markdown`` with its headings one level down (the report's title is the only #)."""
    return [("#" + line) if line.startswith("#") else line for line in markdown.splitlines()]


# ---- reading what the stages wrote -------------------------------------------------------


def _load_report(stage: dict) -> dict | None:
    """The stage's own report file (train_report.json or manifest.json), if it wrote one."""
    if not stage.get("output_dir"):
        return None
    name = "train_report.json" if stage.get("kind") == "train" else "manifest.json"
    path = storage.join(stage["output_dir"], name)
    try:
        return json.loads(storage.read_text(path)) if storage.exists(path) else None
    except (OSError, ValueError) as e:
        log.warning("report: cannot read %s: %s", path, e)
        return None


def _read_columns(output_dir: str, file_name: str, columns: list[str]) -> dict[str, list]:
    """The ``columns`` of ``<output_dir>/<file_name>`` that exist (none if the file doesn't)."""
    path = storage.join(output_dir, file_name)
    if not storage.exists(path):
        return {}
    fs, local = storage.filesystem(path)
    with fs.open_input_file(local) as f:
        pf = pq.ParquetFile(f)
        present = [c for c in columns if c in pf.schema_arrow.names]
        return pf.read(columns=present).to_pydict() if present else {}


def _get(d, *keys):
    for key in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


# ---- formatting --------------------------------------------------------------------------


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return NA
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value).replace("|", "\\|").replace("\n", " ")
    if isinstance(value, int) or value.is_integer():
        return f"{int(value):,}"
    return f"{value:.{digits}g}"


def _fixed(value, decimals: int) -> str:
    return f"{value:.{decimals}f}" if isinstance(value, int | float) else NA


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]


def _dict_table(title: str, d, key_name: str = "key") -> list[str]:
    """A small two-column table of the scalar entries of ``d`` ("none" when empty)."""
    items = [[k, v] for k, v in (d or {}).items() if not isinstance(v, dict | list)]
    body = _table([key_name, "value"], items) if items else ["none"]
    return [f"**{title}**", "", *body, ""]


# ---- summary -----------------------------------------------------------------------------


def _summary(stages: list[dict]) -> list[str]:
    header = ["stage", "kind", "status", "main count", "failed", "time s", "tokens in"]
    header += ["tokens out", "cost USD"]
    rows = [_summary_row(s) for s in stages]
    known = [[r[k] for r in rows if _is_number(r[k])] for k in range(5, 9)]
    total = [sum(values) if values else None for values in known]
    rows.append(["**total**", "", "", "", "", *total])
    for row in rows:
        row[5], row[8] = _fixed(row[5], 1), _fixed(row[8], 4)
    return _table(header, rows)


def _summary_row(stage: dict) -> list:
    report, kind = stage["report"], stage.get("kind")
    time_s = stage.get("wall_time_s")
    if time_s is None:
        time_s = _get(report, "wall_time_s")
    if kind == "train":
        unit, n, failed = "samples", _get(report, "tokenization", "samples"), None
    elif kind == "eval":
        unit, failed = "models", None
        n = len(_get(report, "models") or {}) or (1 if report else None)
    else:
        unit = OUTPUT_NAME.get(kind, "records")
        n, failed = _get(report, "counts", unit), _get(report, "counts", "failed")
        share = _get(report, "failure_share")  # failed records, "excluded" ones not counted
        if _is_number(failed) and _is_number(share):
            failed = f"{_fmt(failed)} ({share:.1%})"
    main = NA if n is None else f"{_fmt(n)} {unit}"
    # Every batch the output holds, whichever run made it; older manifests: this run's.
    usage = _get(report, "usage_total") or _get(report, "usage_this_run")
    usage_cells = [_get(usage, k) for k in USAGE_COLUMNS]
    status = stage.get("status")
    attempts = len(stage.get("attempts") or [])
    if attempts > 1:
        status = f"{status} ({attempts} attempts)"
    return [stage.get("name"), kind, status, main, failed, time_s, *usage_cells]


# ---- one section per stage ---------------------------------------------------------------


def _stage_section(stage: dict, plot_dir: Path) -> list[str]:
    name, kind, status = stage["name"], stage.get("kind"), stage.get("status")
    lines = [f"## {name} ({kind}): {status}", "", f"Output: `{stage.get('output_dir') or NA}`", ""]
    if stage.get("error"):
        lines += ["**Error:**", "", "```text", str(stage["error"]).strip(), "```", ""]
    if stage["report"] is None:
        lines += [f"No report found ({NA}).", ""]
    try:
        if kind == "train":
            lines += _train_section(stage, plot_dir)
        elif kind in OUTPUT_NAME:
            lines += _generation_section(stage, plot_dir)
    except Exception as e:  # noqa: BLE001 -- the report runs after failures; never mask them
        log.warning("report: stage %s section failed: %r", name, e)
        lines += [f"Report section incomplete: `{type(e).__name__}: {e}`", ""]
    return lines


def _train_section(stage: dict, plot_dir: Path) -> list[str]:
    report = stage["report"] or {}
    data = report.get("data") or {}
    lines = _dict_table("Data", {k: data.get(k) for k in ("path", "read", "used")})
    lines += _dict_table("Skipped records", data.get("skipped"), "reason")
    lines += _dict_table("Tokenization", report.get("tokenization"), "count")
    lines += _dict_table("Final metrics", report.get("final_metrics"), "metric")
    steps = read_metrics(stage["output_dir"]) if stage.get("output_dir") else []
    if not steps:
        return lines + ["No per-step metrics found.", ""]
    lines += [f"{len(steps)} logged steps (last: {steps[-1]['step']}).", ""]
    if len(steps) < 20:
        last = steps[-1]
        per_step = int(last.get("samples_seen", 0) / max(last["step"], 1))
        lines += [
            (
                f"How to read these curves: each point is the loss of that step's own batch "
                f"({per_step} instructions). Over {len(steps)} steps the points differ more by "
                "which instructions a batch holds than by training, so a line that rises or falls "
                "here is no trend; the evaluation at the top of the report says whether the model "
                "got better."
            ),
            "",
        ]
    return lines + _training_plot(plot_dir, stage["name"], steps)


def _generation_section(stage: dict, plot_dir: Path) -> list[str]:
    report, kind = stage["report"] or {}, stage["kind"]
    counts = report.get("counts") or {}
    inp = report.get("input") or {}
    lines = _dict_table("Input", {k: inp.get(k) for k in ("path", "read", "used")})
    lines += _dict_table("Skipped inputs", inp.get("skipped"), "reason")
    lines += _dict_table("Counts", counts, "count")
    lines += _dict_table("Failure reasons", counts.get("failure_reasons"), "reason")
    lines += _dict_table(
        "Usage (all runs of this stage)",
        report.get("usage_total") or report.get("usage_this_run"),
        "field",
    )
    if report.get("means_this_run"):
        lines += _dict_table("Means (this run)", report["means_this_run"], "field")
    out_dir, name = stage.get("output_dir"), stage["name"]
    if kind == "rank_contextual":
        lines += _judge_plot(plot_dir, name, counts)
    if not out_dir:
        return lines
    if kind.startswith("rank_"):
        lines += _score_plot(plot_dir, name, _read_columns(out_dir, "ranked.parquet", ["scores"]))
    else:
        columns = _read_columns(out_dir, "candidates.parquet", ["mean_rouge_l", "trials"])
        lines += _diversity_plot(plot_dir, name, columns)
    return lines


# ---- plots -------------------------------------------------------------------------------


def _figure(ncols: int, width: float):
    """A figure with ``ncols`` gridded panels; a bare Figure, so no pyplot state is left behind."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, 4))
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig, axes


def _save(fig, plot_dir: Path, stem: str, title: str) -> list[str]:
    file_name = re.sub(r"[^A-Za-z0-9_.-]", "_", stem) + ".png"
    fig.tight_layout()
    fig.savefig(plot_dir / file_name, dpi=100)
    return [f"![{title}](report/{file_name})", ""]


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _numbers(values) -> list[float]:
    """The finite numbers among ``values`` (None, NaN and non-numbers dropped)."""
    return [float(v) for v in values if _is_number(v)]


def _training_plot(plot_dir, name, steps: list[dict]) -> list[str]:
    fig, (left, right) = _figure(2, 11)
    panels = [
        (left, {"loss": "total", "ranking_loss": "ranking", "mle_loss": "MLE"}, "loss"),
        (right, {"ranking_accuracy": "ranking accuracy"}, "accuracy (batch)"),
    ]
    for ax, series, ylabel in panels:
        for key, label in series.items():
            points = [(r["step"], r[key]) for r in steps if _is_number(r.get(key))]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=label)
        ax.set(xlabel="step", ylabel=ylabel, title=f"{name}: {ylabel}")
        ax.legend()
    return _save(fig, plot_dir, f"{name}_training", "training curves")


def _bars(ax, labels: list[str], values, **kwargs):
    """Bars at positions 0..n-1 labelled ``labels`` (strings as categories make matplotlib log
    a notice whenever they look like numbers)."""
    drawn = ax.bar(range(len(labels)), values, **kwargs)
    ax.set_xticks(range(len(labels)), labels)
    return drawn


def _evaluation_plot(plot_dir, models: list[dict]) -> list[str]:
    """One panel per task: each model's main metric with its interval."""
    from tuna_ray.eval.table import MAIN_METRIC

    tasks: dict[str, str] = {}
    for m in models:
        for name, res in m.get("tasks", {}).items():
            tasks.setdefault(name, res.get("kind", ""))
    if not tasks:
        return []
    fig, axes = _figure(len(tasks), 4.5 * len(tasks))
    for ax, (task, kind) in zip(axes, tasks.items()):
        label, key, scale = MAIN_METRIC.get(kind, ("value", "value", 1.0))
        names, values, errors = [], [], [[], []]
        for m in models:
            res = m.get("tasks", {}).get(task)
            if not res or not _is_number(res.get(key)):
                continue
            value = res[key] * scale
            low, high = (res.get("ci") or [res[key], res[key]])[:2]
            names.append((m.get("model") or {}).get("label") or "?")
            values.append(value)
            errors[0].append(max(0.0, value - low * scale))
            errors[1].append(max(0.0, high * scale - value))
        _bars(ax, names, values, yerr=errors, capsize=4, color="tab:blue")
        ax.set(title=task, ylabel=label, xlabel="model")
    return _save(fig, plot_dir, "evaluation", "evaluation: each model on each task")


def _score_plot(plot_dir, name, columns: dict[str, list]) -> list[str]:
    lists = [_numbers(s) for s in columns.get("scores", []) if s]
    scores = [x for s in lists for x in s]
    gaps = [max(s) - min(s) for s in lists if len(s) >= 2]
    if not scores:
        return ["No scores to plot.", ""]
    fig, (left, right) = _figure(2, 10)
    left.hist(scores, bins=30, color="tab:blue")
    left.set(xlabel="score", ylabel="candidates", title=f"All scores (n={len(scores)})")
    right.hist(gaps, bins=30, color="tab:orange")
    right.set(xlabel="best - worst score", ylabel="records", title=f"Score gap (n={len(gaps)})")
    return _save(fig, plot_dir, f"{name}_scores", "score distributions")


def _judge_plot(plot_dir, name, counts: dict) -> list[str]:
    reasons = counts.get("failure_reasons") or {}
    bars = {
        "ranked": counts.get("ranked"),
        "parse failed": reasons.get("parse_failed"),
        "API failed": reasons.get("api"),
        "excluded": reasons.get("excluded"),
    }
    values = [v if _is_number(v) else 0 for v in bars.values()]
    total = sum(values)
    calls, parse, api = (
        _fmt(counts.get(k)) for k in ("judge_calls", "parse_failures", "api_failures")
    )
    lines = [f"Judge calls: {calls}; unparsable replies: {parse}; API errors: {api}.", ""]
    if not total:
        return lines
    fig, (ax,) = _figure(1, 6.4)
    colors = ["tab:green", "tab:orange", "tab:red", "tab:gray"]
    drawn = _bars(ax, list(bars), [v / total for v in values], color=colors)
    ax.bar_label(drawn, labels=[f"{int(v)}" for v in values])
    title = f"{name}: judge outcomes ({int(total)} records)"
    ax.set(xlabel="outcome", ylabel="fraction of records", ylim=(0, 1.1), title=title)
    return lines + _save(fig, plot_dir, f"{name}_judge", "judge outcomes")


def _diversity_plot(plot_dir, name, columns: dict[str, list]) -> list[str]:
    rouge = _numbers(columns.get("mean_rouge_l", []))
    trials = [int(x) for x in _numbers(columns.get("trials", []))]
    if not rouge and not trials:
        return ["No diversity columns to plot.", ""]
    fig, (left, right) = _figure(2, 10)
    left.hist(rouge, bins=30, range=(0, 1), color="tab:purple")
    similarity = "Candidate similarity (lower = more diverse)"
    left.set(xlabel="mean pairwise ROUGE-L", ylabel="records", title=similarity)
    values = sorted(set(trials))
    _bars(right, [str(v) for v in values], [trials.count(v) for v in values], color="tab:cyan")
    right.set(xlabel="sampling trials", ylabel="records", title="Trials per record")
    return _save(fig, plot_dir, f"{name}_diversity", "candidate diversity")
