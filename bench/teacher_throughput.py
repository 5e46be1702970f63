"""Benchmark the openai engine's pacing against a server whose latency is fixed.

Starts ``tuna-ray serve --mode fixed --fixed-delay-s D`` (canned answers after D seconds, served
concurrently) and, for each (qps limit, max_concurrency) of the grid, runs
``OpenAIEngine.sample`` over ``--requests`` distinct prompts (n=1, no cache, no retries). A row
shows the wall time, the achieved requests/s on the client (requests / wall) and on the server
((requests - 1) / (last receive - first receive), from ``/admin/stats``), the most requests the
server saw at once, and the theoretical cap ``min(qps, concurrency / delay)``.

    .venv/bin/python bench/teacher_throughput.py --qps 5,20,50 --concurrency 1,4,16
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time

from tuna_ray.engines.base import EngineError, Prompt, SamplingParams
from tuna_ray.engines.openai_engine import OpenAIEngine, OpenAIEngineConfig
from tuna_ray.serve.local import start_local_server


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--qps", default="5,20,50", help="comma-separated qps limits")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated max_concurrency")
    p.add_argument("--requests", type=int, default=100, help="prompts per grid cell")
    p.add_argument("--delay", type=float, default=0.05, help="server seconds per request")
    p.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    p.add_argument("--max-tokens", type=int, default=64)
    return p.parse_args(argv)


def run_cell(server, args, qps: float, concurrency: int) -> dict:
    config = OpenAIEngineConfig(
        base_url=server.base_url,
        model="fixed",
        endpoint=args.endpoint,
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
    stats = server.stats()
    span = (stats["last_request_at"] or 0.0) - (stats["first_request_at"] or 0.0)
    cap = min(qps, concurrency / args.delay) if args.delay > 0 else qps
    client_rps = args.requests / wall
    return {
        "qps": qps,
        "concurrency": concurrency,
        "requests": stats["requests"],
        "errors": sum(isinstance(r, EngineError) for r in results),
        "wall": wall,
        "client": client_rps,
        "server": (stats["requests"] - 1) / span if span > 0 else float("nan"),
        "in_flight": stats["max_in_flight"],
        "ratio": client_rps / qps,
        "cap": cap,
        "of_cap": client_rps / cap,
    }


COLUMNS = (  # (header, key, format)
    ("qps limit", "qps", "{:>9g}"),
    ("concurrency", "concurrency", "{:>11d}"),
    ("requests", "requests", "{:>8d}"),
    ("errors", "errors", "{:>6d}"),
    ("wall s", "wall", "{:>6.2f}"),
    ("client req/s", "client", "{:>12.1f}"),
    ("server req/s", "server", "{:>12.1f}"),
    ("max in flight", "in_flight", "{:>13d}"),
    ("client/qps", "ratio", "{:>10.2f}"),
    ("cap req/s", "cap", "{:>9.1f}"),
    ("client/cap", "of_cap", "{:>10.2f}"),
)


def main(argv=None) -> int:
    args = parse_args(argv)
    qps_grid = [float(x) for x in args.qps.split(",")]
    concurrency_grid = [int(x) for x in args.concurrency.split(",")]
    print("$ " + shlex.join([sys.executable, *sys.argv]))
    print(
        f"python {platform.python_version()}, {platform.system()} {platform.machine()}; "
        f"server: tuna-ray serve --mode fixed --fixed-delay-s {args.delay:g}; "
        f"endpoint {args.endpoint}, n=1, max_tokens {args.max_tokens}, no cache, no retries"
    )
    print("cap = min(qps, concurrency / delay); client = requests / wall; "
          "server = (requests - 1) / (last receive - first receive)")  # fmt: skip
    print("  ".join(header for header, _, _ in COLUMNS), flush=True)
    with start_local_server(mode="fixed", fixed_delay_s=args.delay) as server:
        for qps in qps_grid:
            for concurrency in concurrency_grid:
                row = run_cell(server, args, qps, concurrency)
                cells = [form.format(row[key]) for _, key, form in COLUMNS]
                print("  ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
