"""The run report: counts per stage, totals, PNG plots that exist, robustness to missing files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tuna_ray.report import write_run_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DEMO_TRAIN = Path(__file__).resolve().parents[1] / "runs" / "demo-train"


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _metrics_line(step: int, loss: float) -> str:
    row = {"step": step, "loss": loss, "ranking_loss": loss / 4, "mle_loss": loss * 3 / 4}
    return json.dumps({**row, "ranking_accuracy": 0.25 * step, "lr": 1e-5}) + "\n"


def _manifest(stage: str, counts: dict, usage: tuple[int, int, float], skipped: dict) -> dict:
    prompt, completion, cost = usage
    return {
        "stage": stage,
        "config_hash": "abc",
        "input": {
            "path": "in.parquet",
            "read": 10,
            "used": 10 - sum(skipped.values()),
            "skipped": skipped,
        },
        "counts": {"done_before": 0, **counts},
        "usage_this_run": {
            "requests": 10,
            "cached": 0,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "cost_usd": cost,
            "retries": 1,
        },
        "wall_time_s": 3.5,
    }


def _stage(name, kind, output_dir, *, status="ran", report=None, error=None) -> dict:
    return {
        "name": name,
        "kind": kind,
        "status": status,
        "output_dir": str(output_dir),
        "report": report,
        "wall_time_s": 2.0,
        "error": error,
    }


@pytest.fixture
def fake_run(tmp_path: Path) -> tuple[Path, list[dict]]:
    run = tmp_path / "run"
    train = run / "train_p"
    (train / "metrics").mkdir(parents=True)
    # a resumed run logs step 2 twice: the later file wins; a crash cut the last line short
    (train / "metrics" / "steps0000001-0000002.jsonl").write_text(
        _metrics_line(1, 3.0) + _metrics_line(2, 9.9)
    )
    (train / "metrics" / "steps0000002-0000003.jsonl").write_text(
        _metrics_line(2, 2.5) + _metrics_line(3, 2.0) + '{"step": 4, "lo'
    )
    _json(
        train / "train_report.json",
        {
            "data": {"read": 20, "used": 12, "skipped": {"too_long": 3}},
            "tokenization": {"records": 12, "samples": 12, "truncated_candidates": 4},
            "total_steps": 3,
            "final_metrics": {"loss": 2.0, "ranking_accuracy": 0.75},
            "wall_time_s": 9.0,
        },
    )

    rank_p = run / "rank_p"
    rank_p.mkdir()
    scores = [[-1.0, -2.5, -0.5], None, [0.0, -4.0], [-3.0, -3.5, -1.0, -2.0]]
    pq.write_table(
        pa.table({"id": ["a", "b", "c", "d"], "scores": scores}), rank_p / "ranked.parquet"
    )
    manifest_p = _manifest(
        "rank_probabilistic",
        {"ranked": 4, "failed": 1, "failure_reasons": {"no_tokens": 1}, "dropped_empty": 2},
        (1000, 0, 0.5),
        {"bad_value": 1},
    )
    manifest_p["failure_share"] = 0.2  # 1 of the 5 records it was given

    sample = run / "sample"
    sample.mkdir()
    pq.write_table(
        pa.table(
            {"id": ["a", "b", "c"], "mean_rouge_l": [0.2, 0.45, float("nan")], "trials": [1, 1, 3]}
        ),
        sample / "candidates.parquet",
    )
    _json(
        sample / "manifest.json",
        _manifest(
            "sample",
            {"candidates": 7, "failed": 0, "failure_reasons": {}, "trials": 9},
            (200, 3000, 0.25),
            {},
        ),
    )

    rank_c = run / "rank_c"
    rank_c.mkdir()
    pq.write_table(pa.table({"scores": [[3.0, 1.0, 0.0], [2.0, 2.0]]}), rank_c / "ranked.parquet")
    manifest_c = _manifest(
        "rank_contextual",
        {
            "ranked": 6,
            "failed": 3,
            "parse_failures": 4,
            "api_failures": 2,
            "judge_calls": 20,
            "failure_reasons": {"parse_failed": 1, "api": 1, "excluded": 1},
        },
        (5000, 800, 1.25),
        {},
    )

    stages = [
        _stage("train_p", "train", train),  # report read from train_report.json
        _stage("rank_p", "rank_probabilistic", rank_p, report=manifest_p),
        _stage("sample", "sample", sample, status="skipped"),  # report read from manifest.json
        _stage("rank_c", "rank_contextual", rank_c, report=manifest_c),
        _stage(
            "train_c",
            "train",
            run / "train_c",
            status="failed",
            error="RuntimeError: CUDA out of memory",
        ),
    ]
    return run, stages


def _png_links(report_md: str) -> list[str]:
    return re.findall(r"\]\((report/[^)]+\.png)\)", report_md)


def test_report_shows_each_stage_counts_and_totals(fake_run):
    run, stages = fake_run
    path = write_run_report(str(run), stages)
    assert path == str(run / "report.md")
    text = Path(path).read_text()
    assert text.startswith(f"# Run report: `{run}`")
    assert "| train_p | train | ran | 12 samples | n/a | 2.0 | n/a | n/a | n/a |" in text
    assert (
        "| rank_p | rank_probabilistic | ran | 4 ranked | 1 (20.0%) | 2.0 | 1,000 | 0 | 0.5000 |"
        in text
    )
    assert "| sample | sample | skipped | 7 candidates | 0 | 2.0 | 200 | 3,000 | 0.2500 |" in text
    assert "| rank_c | rank_contextual | ran | 6 ranked | 3 | 2.0 | 5,000 | 800 | 1.2500 |" in text
    assert "| **total** |  |  |  |  | 10.0 | 6,200 | 3,800 | 2.0000 |" in text
    # per-stage count tables: skipped inputs, stage counts and failure reasons
    assert "| too_long | 3 |" in text and "| truncated_candidates | 4 |" in text
    assert "3 logged steps (last: 3)." in text
    assert "| bad_value | 1 |" in text and "| dropped_empty | 2 |" in text
    assert "| no_tokens | 1 |" in text and "| trials | 9 |" in text
    assert "| judge_calls | 20 |" in text and "| parse_failed | 1 |" in text
    assert "Judge calls: 20; unparsable replies: 4; API errors: 2." in text


def test_report_plots_are_linked_valid_pngs(fake_run):
    run, stages = fake_run
    text = Path(write_run_report(str(run), stages)).read_text()
    links = _png_links(text)
    assert sorted(links) == [
        "report/rank_c_judge.png",
        "report/rank_c_scores.png",
        "report/rank_p_scores.png",
        "report/sample_diversity.png",
        "report/train_p_training.png",
    ]
    for link in links:
        data = (run / link).read_bytes()
        assert data.startswith(PNG_SIGNATURE), link
        assert len(data) > 5_000, link


def test_failed_stage_shows_its_error_and_the_rest_still_renders(fake_run):
    run, stages = fake_run
    text = Path(write_run_report(str(run), stages)).read_text()
    failed = text[text.index("## train_c (train): failed") :]
    assert "RuntimeError: CUDA out of memory" in failed
    assert "No report found (n/a)." in failed
    assert "No per-step metrics found." in failed


def test_missing_files_and_fields_render_as_na(tmp_path: Path):
    empty = tmp_path / "nothing_here"
    stages = [
        _stage("rank_p", "rank_probabilistic", empty, report={"counts": {}}),
        _stage("rank_c", "rank_contextual", empty, report={"counts": {"ranked": 0}}),
        _stage("sample", "sample", empty),
        _stage("odd", "unknown_kind", empty, report={"usage_this_run": "garbage"}),
        {"kind": "train", "status": "failed", "error": "killed"},  # no name, no output_dir
    ]
    stages[1]["wall_time_s"] = None
    text = Path(write_run_report(str(tmp_path / "run"), stages)).read_text()
    assert "| rank_p | rank_probabilistic | ran | n/a | n/a | 2.0 | n/a | n/a | n/a |" in text
    assert "| rank_c | rank_contextual | ran | 0 ranked | n/a | n/a | n/a | n/a | n/a |" in text
    assert "No scores to plot." in text and "## stage_4 (train): failed" in text
    assert "| **total** |  |  |  |  | 6.0 | n/a | n/a | n/a |" in text
    assert _png_links(text) == []


def test_report_accepts_a_file_uri(fake_run):
    run, stages = fake_run
    path = write_run_report(run.as_uri(), stages)
    assert path == run.as_uri() + "/report.md"
    assert (run / "report.md").exists() and (run / "report" / "rank_c_judge.png").exists()


@pytest.mark.skipif(not DEMO_TRAIN.is_dir(), reason="runs/demo-train not present")
def test_real_demo_train_run(tmp_path: Path):
    stage = _stage("train", "train", DEMO_TRAIN)
    stage["wall_time_s"] = None
    text = Path(write_run_report(str(tmp_path), [stage])).read_text()
    assert "| train | train | ran | 32 samples | n/a | 28.3 |" in text
    assert "8 logged steps (last: 8)." in text
    assert "| ranking_accuracy | 0.5 |" in text
    png = tmp_path / "report" / "train_training.png"
    assert _png_links(text) == ["report/train_training.png"]
    assert png.read_bytes().startswith(PNG_SIGNATURE)
