"""Benchmark the training data feed: tokenisation wall time with 1 vs all CPUs, and memory.

Builds N synthetic ranked records x 4 candidates (Alpaca-like lengths), then, in one local Ray
session, runs the trainer's own data path (``build_training_dataset`` + ``split_by_rank``) with
1 tokenisation actor and with one per CPU, interleaved (1, all, 1, all, ...), and prints the
median wall time of each, their ratio, the driver's peak RSS and the peak RSS of the Ray
workers (the tokenisation actors) sampled while it runs.

    .venv/bin/python bench/tokenize_feed.py --records 52000 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import threading
import time

WORDS = [
    "the",
    "a",
    "model",
    "answer",
    "instruction",
    "data",
    "train",
    "rank",
    "better",
    "response",
    "explain",
    "write",
    "list",
    "give",
    "describe",
    "summarise",
    "first",
    "second",
    "because",
    "however",
    "example",
    "people",
    "water",
    "energy",
    "light",
    "time",
]


def synthetic_records(n: int, candidates: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    return [
        {
            "id": f"rec-{i}",
            "instruction": text(5, 30),
            "input": text(0, 20) if rng.random() < 0.4 else "",
            "responses": [text(5, 220) for _ in range(candidates)],
        }
        for i in range(n)
    ]


class WorkerRSS:
    """Peak RSS (MB) over the processes named ray::* while running."""

    def __init__(self):
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        while not self._stop.is_set():
            for p in psutil.process_iter(["name", "cmdline", "memory_info"]):
                cmd = " ".join(p.info["cmdline"] or [])
                if "MapWorker" in cmd or "TokenizeRanked" in cmd:
                    self.peak = max(self.peak, p.info["memory_info"].rss / 2**20)
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=52000)
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--world", type=int, default=2, help="training workers to split for")
    args = p.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from tuna_ray.models import resolve_model
    from tuna_ray.ray_setup import ensure_ray
    from tuna_ray.train.dataset import build_training_dataset, split_by_rank

    model = resolve_model(args.model)
    records = synthetic_records(args.records, args.candidates)
    ensure_ray()
    import ray

    cpus = int(ray.cluster_resources()["CPU"])
    variants = {"1 actor": 1, f"{cpus} actors": cpus}
    times: dict[str, list[float]] = {k: [] for k in variants}
    worker_peak = {k: 0.0 for k in variants}
    for _ in range(args.repeats):
        for name, actors in variants.items():
            with WorkerRSS() as rss:
                t0 = time.perf_counter()
                kept, stats = build_training_dataset(
                    records,
                    model_path=model,
                    template="alpaca",
                    system_prompt=None,
                    max_length=512,
                    epochs=1,
                    seed=0,
                    min_candidates=2,
                    num_tokenize_actors=actors,
                )
                g = 16 * args.world
                split_by_rank(
                    kept, world=args.world, global_batch=g, total_steps=stats.samples // g
                )
                times[name].append(time.perf_counter() - t0)
            worker_peak[name] = max(worker_peak[name], rss.peak)
    print(f"{args.records} records x {args.candidates} candidates, {cpus} CPUs in Ray")
    print(f"{'variant':>12}  {'median s':>8}  {'runs':>20}  {'worker peak RSS MB':>18}")
    for name in variants:
        runs = ", ".join(f"{t:.1f}" for t in times[name])
        print(
            f"{name:>12}  {statistics.median(times[name]):8.1f}  {runs:>20}  "
            f"{worker_peak[name]:18.0f}"
        )
    one, many = (statistics.median(times[k]) for k in variants)
    print(f"speed-up all CPUs / 1: {one / many:.2f}x")
    print(f"driver peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
