"""Benchmark the teacher's pacing against a server whose latency is fixed.

Two modes, both against ``tuna-ray serve --mode fixed --fixed-delay-s D`` (canned answers after
D seconds, served concurrently; ``/admin/stats`` counts what arrives):

- engine (default): for each (qps limit, max_concurrency) of the grid, ``OpenAIEngine.sample``
  over ``--requests`` distinct prompts (n=1, no cache, no retries);
- ``--stage``: the whole probabilistic ranking STAGE (``run_probabilistic``: Ray Data actors,
  resampling, reference and candidate scoring, parts, manifest) over ``--records``
  instructions, for each (qps, max_concurrency) of the grid. The configured rate of the stage
  is ``qps * actors`` (each actor has its own limiter).

A row shows the wall time, the achieved requests/s on the client (requests / wall; for the
stage, wall includes starting Ray and the actors) and on the server ((requests - 1) / (last
receive - first receive)), the most requests the server saw at once, and the theoretical cap
``min(qps, concurrency / delay)`` (times actors for the stage). For the stage, ``server/qps``
is the figure of merit: the stage keeps the endpoint as busy as it is allowed to.

    .venv/bin/python bench/teacher_throughput.py --qps 5,20,50 --concurrency 1,4,16
    .venv/bin/python bench/teacher_throughput.py --stage --delay 2 --qps 8 --concurrency 32 \\
        --records 160 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

from tuna_ray.engines.base import EngineError, Prompt, SamplingParams
from tuna_ray.engines.openai_engine import OpenAIEngine, OpenAIEngineConfig
from tuna_ray.serve.local import start_local_server

SHIPPED = Path(__file__).resolve().parents[1] / "jobs" / "data" / "alpaca_data_first200.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--qps", default="5,20,50", help="comma-separated qps limits (per actor)")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated max_concurrency")
    p.add_argument("--requests", type=int, default=100, help="prompts per grid cell (engine)")
    p.add_argument("--delay", type=float, default=0.05, help="server seconds per request")
    p.add_argument("--endpoint", choices=("chat", "completions"), default=None,
                   help="default: chat for the engine, completions for the stage")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=64)
    stage = p.add_argument_group("--stage: the whole probabilistic ranking stage")
    stage.add_argument("--stage", action="store_true", help="run the stage, not the engine")
    stage.add_argument("--records", type=int, default=160, help="instructions per grid cell")
    stage.add_argument("--actors", type=int, default=1)
    stage.add_argument("--batch-size", type=int, default=16)
    stage.add_argument("--n", type=int, default=4, help="samples per instruction")
    stage.add_argument("--no-reference", action="store_true", help="include_reference: false")
    return p.parse_args(argv)


def run_cell(server, args, qps: float, concurrency: int) -> dict:
    config = OpenAIEngineConfig(
        base_url=server.base_url,
        model="fixed",
        endpoint=args.endpoint or "chat",
        qps=qps,
        max_concurrency=concurrency,
        max_retries=0,
        timeout_s=30.0,
    )
    engine = OpenAIEngine(config)
    prompts = [
        Prompt(f"q{qps}-{concurrency}-{i}", text=f"Question {i}: say something.\nAnswer:")
        for i in range(args.requests)
    ]
    server.reset_stats()
    started = time.perf_counter()
    results = engine.sample(prompts, SamplingParams(n=1, max_tokens=args.max_tokens))
    wall = time.perf_counter() - started
    errors = sum(isinstance(r, EngineError) for r in results)
    return _row(server.stats(), args, qps, concurrency, wall, errors, actors=1)


def _instructions(path: Path, count: int, tag: str) -> None:
    """``count`` Alpaca records with fresh ids (the shipped 200, repeated with a variant tag)."""
    base = json.loads(SHIPPED.read_text())
    out = []
    for i in range(count):
        r = base[i % len(base)]
        out.append(
            {
                "id": f"{tag}-{i}",
                "instruction": r["instruction"] + ("" if i < len(base) else f" (#{i})"),
                "input": r["input"],
                "output": r["output"],
            }
        )
    path.write_text(json.dumps(out))


def run_stage_cell(server, args, qps: float, concurrency: int, workdir: Path) -> dict:
    from tuna_ray.config import ProbabilisticStageConfig
    from tuna_ray.ranking.probabilistic_stage import run_probabilistic

    tag = f"q{qps:g}-c{concurrency}-{time.time_ns()}"
    data = workdir / f"{tag}.json"
    _instructions(data, args.records, tag)
    fields = {
        "input": {"path": str(data)},
        "output_dir": str(workdir / tag),
        "engine": {
            "kind": "openai",
            "base_url": server.base_url,
            "model": "fixed",
            "endpoint": args.endpoint or "completions",
            "qps": qps,
            "max_concurrency": concurrency,
            "max_retries": 0,
            "timeout_s": 30.0,
        },
        "sampling": {"n": args.n, "max_tokens": args.max_tokens, "seed": 0},
        "include_reference": not args.no_reference,
        "scaling": {"actors": args.actors, "batch_size": args.batch_size},
    }
    if "scoring" in ProbabilisticStageConfig.model_fields and not args.no_reference:
        fields["scoring"] = "echo"  # with include_reference every candidate is scored by echo
    cfg = ProbabilisticStageConfig.model_validate(fields)
    server.reset_stats()
    started = time.perf_counter()
    report = run_probabilistic(cfg)
    wall = time.perf_counter() - started
    return _row(
        server.stats(), args, qps, concurrency, wall, report["counts"]["failed"], args.actors
    )


def _row(stats, args, qps, concurrency, wall, errors, actors) -> dict:
    span = (stats["last_request_at"] or 0.0) - (stats["first_request_at"] or 0.0)
    cap = actors * (min(qps, concurrency / args.delay) if args.delay > 0 else qps)
    server_rps = (stats["requests"] - 1) / span if span > 0 else float("nan")
    client_rps = stats["requests"] / wall
    return {
        "qps": qps * actors,
        "concurrency": concurrency,
        "requests": stats["requests"],
        "errors": errors,
        "wall": wall,
        "client": client_rps,
        "server": server_rps,
        "in_flight": stats["max_in_flight"],
        "ratio": (server_rps if args.stage else client_rps) / (qps * actors),
        "cap": cap,
        "of_cap": (server_rps if args.stage else client_rps) / cap,
    }


COLUMNS = (  # (header, key, format)
    ("qps limit", "qps", "{:>9g}"),
    ("concurrency", "concurrency", "{:>11d}"),
    ("requests", "requests", "{:>8d}"),
    ("errors", "errors", "{:>6d}"),
    ("wall s", "wall", "{:>6.2f}"),
    ("client req/s", "client", "{:>12.2f}"),
    ("server req/s", "server", "{:>12.2f}"),
    ("max in flight", "in_flight", "{:>13d}"),
    ("{}/qps", "ratio", "{:>10.2f}"),
    ("cap req/s", "cap", "{:>9.1f}"),
    ("{}/cap", "of_cap", "{:>10.2f}"),
)


def main(argv=None) -> int:
    args = parse_args(argv)
    qps_grid = [float(x) for x in args.qps.split(",")]
    concurrency_grid = [int(x) for x in args.concurrency.split(",")]
    measure = "server" if args.stage else "client"
    print("$ " + shlex.join([sys.executable, *sys.argv]))
    what = (
        f"the probabilistic ranking stage: {args.records} records, {args.actors} actor(s), "
        f"batch {args.batch_size}, n={args.n}, include_reference {not args.no_reference}, "
        f"endpoint {args.endpoint or 'completions'}"
        if args.stage
        else f"the engine: endpoint {args.endpoint or 'chat'}, n=1"
    )
    print(
        f"python {platform.python_version()}, {platform.system()} {platform.machine()}; "
        f"server: tuna-ray serve --mode fixed --fixed-delay-s {args.delay:g}; {what}; "
        f"max_tokens {args.max_tokens}, no cache, no retries"
    )
    print("qps limit = qps x actors; cap = min(qps, concurrency / delay) x actors; "
          "client = requests / wall; server = (requests - 1) / (last receive - first receive)")  # fmt: skip
    print("  ".join(h.format(measure) for h, _, _ in COLUMNS), flush=True)
    with (
        start_local_server(mode="fixed", fixed_delay_s=args.delay) as server,
        tempfile.TemporaryDirectory(prefix="tuna-bench-") as tmp,
    ):
        for qps in qps_grid:
            for concurrency in concurrency_grid:
                if args.stage:
                    row = run_stage_cell(server, args, qps, concurrency, Path(tmp))
                else:
                    row = run_cell(server, args, qps, concurrency)
                cells = [form.format(row[key]) for _, key, form in COLUMNS]
                print("  ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
