"""Benchmark one Tuna optimizer step on real Alpaca lengths: three formulations side by side.

- ``reference``: the reference code's layout: every one of the B·N sequences padded to
  ``--max-length``, full-vocabulary log-softmax at every position, gather, mask
  (``reference_candidate_logprobs``);
- ``padded``: B·N sequences padded to the longest, output head only where response tokens are
  predicted (``candidate_logprobs``, the trainer's ``formulation: padded``);
- ``packed``: each prompt computed once, answers packed without padding, chunked output head
  (``tuna_ray.train.packing``, the trainer's default).

Batches come from the shipped Alpaca records (jobs/data/alpaca_data_first200.json): B
instructions, each with N answers drawn from the shipped outputs, rendered with the Alpaca
template and tokenised by the trainer's own feature code with the model's tokenizer. Each
variant runs in its own subprocess (peak memory is per process): one warm-up step, then
``--steps`` timed steps (median). ``--repeats R`` runs the variants R times interleaved
(reference, padded, packed, reference, ...) and takes the median over repeats. Every variant
starts from the same weights on the same batch, so the warm-up losses must agree.

    .venv/bin/python bench/train_step.py                     # quick: B=2
    .venv/bin/python bench/train_step.py --batch 16 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

VARIANTS = ("reference", "padded", "packed")
ALPACA = Path(__file__).resolve().parents[1] / "jobs" / "data" / "alpaca_data_first200.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--batch", type=int, default=2, help="instructions per step")
    p.add_argument("--n", type=int, default=4, help="answers per instruction")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--repeats", type=int, default=1, help="interleaved runs of every variant")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--variant", choices=VARIANTS, help="run one variant only (child process)")
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="which to compare (comma-separated; the reference does not fit 24 GB at --batch 16)",
    )
    args = p.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)}; choose from {list(VARIANTS)}")
    return args


def real_rows(args, tokenizer) -> list[dict]:
    """B shipped instructions x N shipped answers, tokenised as the trainer does."""
    from tuna_ray.data.templates import render_prompt
    from tuna_ray.train.features import tokenize_candidates

    records = json.loads(ALPACA.read_text())
    rng = random.Random(args.seed)
    rows = []
    for rec in rng.sample(records, args.batch):
        answers = [rec["output"]] + [r["output"] for r in rng.sample(records, args.n - 1)]
        prompt = render_prompt(rec["instruction"], rec.get("input") or "", template="alpaca")
        ex = tokenize_candidates(prompt, answers, tokenizer, max_length=args.max_length)
        rows.append({"input_ids": ex.input_ids, "prompt_len": ex.prompt_len})
    return rows


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build_batch(args, rows, pad_id, device):
    import torch.nn.functional as F

    from tuna_ray.train.collate import collate_ranked
    from tuna_ray.train.packing import pack_ranked

    if args.variant == "packed":
        batch = pack_ranked(rows, pad_id)
    else:
        batch = collate_ranked(rows, pad_id)
        if args.variant == "reference":
            extra = args.max_length - batch.input_ids.shape[1]
            batch.input_ids = F.pad(batch.input_ids, (0, extra), value=pad_id)
            batch.attention_mask = F.pad(batch.attention_mask, (0, extra), value=0)
            batch.target_mask = F.pad(batch.target_mask, (0, extra), value=False)
    from dataclasses import fields, replace

    return replace(batch, **{f.name: getattr(batch, f.name).to(device) for f in fields(batch)})


def run_variant(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuna_ray.models import resolve_model
    from tuna_ray.train.logprobs import (
        CandidateScorer,
        candidate_logprobs,
        reference_candidate_logprobs,
    )
    from tuna_ray.train.loss import tuna_loss

    torch.manual_seed(args.seed)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).train()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = real_rows(args, tokenizer)
    batch = build_batch(args, rows, pad_id, device)
    scorer = CandidateScorer(model)
    forward = {
        "reference": lambda: reference_candidate_logprobs(model, batch),
        "padded": lambda: candidate_logprobs(model, batch),
        "packed": lambda: scorer(batch),
    }[args.variant]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rss_after_load = current_rss_mb()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_after_load = torch.cuda.memory_allocated()

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        logprob_sum, num_tokens = forward()
        loss = tuna_loss(logprob_sum, num_tokens, batch.mask)
        loss.total.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        return loss.total.item()

    warmup_loss = step()  # also allocates the AdamW state
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    computed = batch.num_computed_tokens if args.variant == "packed" else batch.input_ids.numel()
    result = {
        "variant": args.variant,
        "real_tokens": batch.num_real_tokens,
        "computed_tokens": computed,
        "step_s": step_s,
        "tokens_per_s": batch.num_real_tokens / step_s,
        "peak_mb": peak_rss_mb() - rss_after_load,
        "loss": warmup_loss,
    }
    if cuda:
        result["peak_mb"] = (torch.cuda.max_memory_allocated() - cuda_after_load) / 2**20
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    argv = sys.argv[1:] if argv is None else list(argv)
    print("command:", " ".join([sys.executable, *sys.argv]))
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    print(
        f"torch {torch.__version__}, threads {args.threads}, device {'cuda' if cuda else 'cpu'}"
        f", model {args.model}, batch {args.batch} x n {args.n} (shipped Alpaca lengths), "
        f"max length {args.max_length}, median of {args.steps} steps (+1 warm-up) x "
        f"{args.repeats} interleaved repeat(s)"
    )
    runs: dict[str, list[dict]] = {v: [] for v in args.variants.split(",")}
    failed: dict[str, str] = {}  # variant -> why (e.g. killed for memory: it did not fit)
    for _ in range(args.repeats):
        for variant, results in runs.items():
            if variant in failed:
                continue
            cmd = [sys.executable, os.path.abspath(__file__), *argv, "--variant", variant]
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
            if proc.returncode == 0:
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            elif proc.returncode == -signal.SIGKILL:
                failed[variant] = "killed (SIGKILL: out of memory on this machine)"
            else:
                failed[variant] = f"exit {proc.returncode}: " + proc.stderr.strip()[-300:]
    mem = "peak MB above model" + (" (CUDA alloc)" if cuda else " (RSS)")
    print(
        f"{'variant':<10} {'real tok':>9} {'computed':>9} {'step s':>8} {'tok/s':>9} "
        f"{'loss':>9}  {mem}"
    )
    summary = {}
    for variant, results in runs.items():
        if variant in failed:
            print(f"{variant:<10} did not run: {failed[variant]}")
            continue
        r = dict(results[0])
        r["step_s"] = statistics.median(x["step_s"] for x in results)
        r["tokens_per_s"] = r["real_tokens"] / r["step_s"]
        r["peak_mb"] = max(x["peak_mb"] for x in results)
        summary[variant] = r
        print(
            f"{variant:<10} {r['real_tokens']:>9} {r['computed_tokens']:>9} {r['step_s']:>8.2f} "
            f"{r['tokens_per_s']:>9.1f} {r['loss']:>9.5f}  {r['peak_mb']:.0f}"
        )
    for variant, base in (("padded", "reference"), ("packed", "reference"), ("packed", "padded")):
        if variant in summary and base in summary:
            r, b = summary[variant], summary[base]
            print(
                f"ratio {variant}/{base}: tokens/s {r['tokens_per_s'] / b['tokens_per_s']:.2f}, "
                f"peak memory {r['peak_mb'] / b['peak_mb']:.2f}"
            )
    if any(not why.startswith("killed") for why in failed.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
