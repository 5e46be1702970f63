"""Benchmark one Tuna optimizer step: our log-prob formulation against the reference code's.

"ours" runs ``candidate_logprobs`` on a ``collate_ranked`` batch (padded to the longest sequence,
output head only at response-predicting positions). "reference" pads every sequence to one
length (``--reference-pad``: the max length, as the reference tokenizer does, or the longest)
and runs ``reference_candidate_logprobs`` (full-vocabulary log-softmax everywhere, gather, mask).
Both then take ``tuna_loss(...).total.backward()`` and an AdamW step.

Each variant runs in its own subprocess so that peak memory is measured separately; the parent
prints a table and the ratio ours/reference. Random token ids, seeded, Alpaca-like lengths.

    .venv/bin/python bench/train_step.py --batch 1 --steps 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

VARIANTS = ("ours", "reference")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--batch", type=int, default=2, help="instructions per step")
    p.add_argument("--n", type=int, default=4, help="candidates per instruction")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--reference-pad", choices=("max_length", "longest"), default="max_length")
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--variant", choices=VARIANTS, help="run one variant only (child process)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    return p.parse_args(argv)


def make_rows(args, vocab_size: int, eos_id: int) -> list[dict]:
    """B instructions x N candidates: prompt ~70 tokens, answers 20-200 tokens + EOS."""
    rng = random.Random(args.seed)
    rows = []
    for _ in range(args.batch):
        prompt = [rng.randrange(100, vocab_size) for _ in range(rng.randint(60, 80))]
        seqs = []
        for _ in range(args.n):
            answer = [rng.randrange(100, vocab_size) for _ in range(rng.randint(20, 200))]
            seqs.append((prompt + answer + [eos_id])[: args.max_length])
        rows.append({"input_ids": seqs, "prompt_len": [len(prompt)] * args.n})
    return rows


def pad_to(batch, length: int, pad_id: int):
    """Right-pad the [S, T] tensors of a RankingBatch to T = ``length``."""
    extra = length - batch.input_ids.shape[1]
    batch.input_ids = F.pad(batch.input_ids, (0, extra), value=pad_id)
    batch.attention_mask = F.pad(batch.attention_mask, (0, extra), value=0)
    batch.target_mask = F.pad(batch.target_mask, (0, extra), value=False)
    return batch


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_variant(args) -> dict:
    from transformers import AutoModelForCausalLM

    from tuna_ray.models import resolve_model
    from tuna_ray.train.collate import collate_ranked
    from tuna_ray.train.logprobs import candidate_logprobs, reference_candidate_logprobs
    from tuna_ray.train.loss import tuna_loss

    torch.manual_seed(args.seed)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    model = AutoModelForCausalLM.from_pretrained(resolve_model(args.model), dtype=torch.float32)
    model.to(device).train()
    cfg = model.config
    eos_id = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else eos_id
    batch = collate_ranked(make_rows(args, cfg.vocab_size, eos_id), pad_id)
    if args.variant == "reference":
        longest = batch.input_ids.shape[1]
        pad_to(batch, args.max_length if args.reference_pad == "max_length" else longest, pad_id)
        logprob_fn = reference_candidate_logprobs
    else:
        logprob_fn = candidate_logprobs
    for name in ("input_ids", "attention_mask", "target_mask"):
        setattr(batch, name, getattr(batch, name).to(device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    rss_after_load = current_rss_mb()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_after_load = torch.cuda.memory_allocated()

    def step():
        optimizer.zero_grad(set_to_none=True)
        logprob_sum, num_tokens = logprob_fn(model, batch)
        loss = tuna_loss(logprob_sum, num_tokens, batch.mask.to(device))
        loss.total.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()

    step()  # warm-up (also allocates the AdamW state)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    step_s = (time.perf_counter() - start) / args.steps

    result = {
        "variant": args.variant,
        "device": str(device),
        "real_tokens": batch.num_real_tokens,
        "padded_tokens": batch.input_ids.numel(),
        "step_s": step_s,
        "tokens_per_s": batch.num_real_tokens / step_s,
        "peak_mb": peak_rss_mb() - rss_after_load,
    }
    if cuda:
        result["peak_mb"] = (torch.cuda.max_memory_allocated() - cuda_after_load) / 2**20
        result["peak_rss_mb"] = peak_rss_mb() - rss_after_load
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.variant:
        result = run_variant(args)
        print(json.dumps(result) if args.json else result)
        return

    argv = sys.argv[1:] if argv is None else list(argv)
    print("command:", " ".join([sys.executable, *sys.argv]))
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    print(
        f"torch {torch.__version__}, threads {args.threads}, device {'cuda' if cuda else 'cpu'}"
        f", model {args.model}, batch {args.batch} x n {args.n}, max length {args.max_length}"
        f", reference pad {args.reference_pad}, steps {args.steps} (+1 warm-up)"
    )
    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--variant", variant, "--json"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])

    mem = "peak MB above model" + (" (CUDA alloc)" if cuda else " (RSS)")
    header = f"{'variant':<10} {'real tok':>9} {'padded tok':>11} {'step s':>8} {'tok/s':>9}  {mem}"
    print(header)
    for r in results.values():
        print(
            f"{r['variant']:<10} {r['real_tokens']:>9} {r['padded_tokens']:>11} "
            f"{r['step_s']:>8.2f} {r['tokens_per_s']:>9.1f}  {r['peak_mb']:.0f}"
        )
    ours, ref = results["ours"], results["reference"]
    print(
        f"ratio ours/reference: tokens/s {ours['tokens_per_s'] / ref['tokens_per_s']:.2f}, "
        f"peak memory {ours['peak_mb'] / ref['peak_mb']:.2f}"
    )


if __name__ == "__main__":
    main()
