"""The GPU check of the training path: one prepared script, one table (bench/gpu_check.sh).

On one GPU, with DeepSpeed ZeRO-3 in bf16 and the trainer's own pieces (``CandidateScorer``,
``pack_ranked``, ``tuna_loss``, ``export.gathered_state_dict``), it measures:

1. a Tuna training step of a ~1B llama (random weights; no model hub needed) on Alpaca-like
   lengths: tokens/s, MFU (6 x params x computed tokens / time / peak bf16 FLOP/s), peak memory;
2. gradient accumulation under ZeRO-3: micro-batch 4 x accumulation 1 vs 2 x 2 on the same
   global batch: loss and grad norm must agree (bf16: within 1e-2 relative);
3. the HF export: gathered module by module, equal to DeepSpeed's own consolidated state dict.

    python bench/gpu_check.py                # on a GPU machine
    python bench/gpu_check.py --device cpu --hidden 64 --layers 2   # dry run of the script

On CPU it runs in fp32 with gloo (a dry run; MFU is not meaningful there).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=16, help="instructions per step (x N answers)")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def alpaca_like_rows(args, count: int, rng: random.Random) -> list[dict]:
    """Prompt ~56 tokens, answers heavy-tailed like Alpaca's (median ~21, mean ~49, max 292)."""
    rows = []
    for _ in range(count):
        prompt = [rng.randrange(100, args.vocab) for _ in range(rng.randint(40, 80))]
        seqs = []
        for _ in range(args.n):
            length = min(292, max(2, int(rng.lognormvariate(3.1, 0.9))))
            seqs.append(prompt + [rng.randrange(100, args.vocab) for _ in range(length)] + [2])
        rows.append({"input_ids": seqs, "prompt_len": [len(prompt)] * args.n})
    return rows


def init_distributed(device: str) -> None:
    import deepspeed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")


def build_engine(args, device: str, micro: int, accumulation: int):
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    from tuna_ray.config import TrainConfig
    from tuna_ray.train.deepspeed_config import build_deepspeed_config
    from tuna_ray.train.logprobs import CandidateScorer

    precision = "bf16" if device == "cuda" else "fp32"
    tc = TrainConfig(zero_stage=3, micro_batch_size=micro, gradient_accumulation_steps=accumulation)
    ds_config = build_deepspeed_config(tc, precision=precision)
    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841 - ZeRO-3 partitions while building
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.75),
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 128),
        num_key_value_heads=max(1, args.hidden // 128),
        max_position_embeddings=2048,
        torch_dtype=torch.bfloat16 if device == "cuda" else torch.float32,
    )
    torch.manual_seed(args.seed)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        lm = LlamaForCausalLM(config)
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm.config.use_cache = False
    scorer = CandidateScorer(lm)
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=1e-5)
    engine, *_ = deepspeed.initialize(model=scorer, optimizer=optimizer, config=ds_config)
    params = sum(getattr(p, "ds_numel", p.numel()) for p in scorer.parameters())
    return engine, params


def one_step(engine, rows, micro: int, device: str):
    """One optimizer step over ``rows`` in micro-batches of ``micro``; (loss, grad norm, tokens)."""
    from dataclasses import fields, replace

    from tuna_ray.train.loss import LossNormaliser, tuna_loss
    from tuna_ray.train.packing import pack_ranked

    batches = [pack_ranked(rows[i : i + micro], 0) for i in range(0, len(rows), micro)]
    normaliser = LossNormaliser.sum(
        LossNormaliser.from_batch(b.mask, b.num_tokens, "all") for b in batches
    ).padded(max(b.mask.shape[1] for b in batches) - 1)
    normaliser = LossNormaliser(
        normaliser.pairs_per_gap.to(device), normaliser.mle_tokens.to(device)
    )
    total, computed = 0.0, 0
    for b in batches:
        b = replace(b, **{f.name: getattr(b, f.name).to(device) for f in fields(b)})
        logprob_sum, num_tokens = engine(b)
        loss = tuna_loss(logprob_sum, num_tokens, b.mask, normaliser=normaliser).total
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()
        total += loss.item()
        computed += b.num_computed_tokens
    return total, float(engine.get_global_grad_norm()), computed


def main(argv=None) -> None:
    args = parse_args(argv)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    init_distributed(device)
    rng = random.Random(args.seed)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    rows_out = []

    # 1. throughput, MFU, memory
    engine, params = build_engine(args, device, micro=args.batch, accumulation=1)
    batch = alpaca_like_rows(args, args.batch, rng)
    one_step(engine, batch, args.batch, device)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, computed = [], 0
    for _ in range(args.steps):
        t0 = time.perf_counter()
        _, _, computed = one_step(engine, batch, args.batch, device)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tflops = 6 * params * computed / step_s / 1e12
    rows_out.append(
        (
            "model",
            f"llama {params / 1e9:.2f}B, {name}, ZeRO-3 {'bf16' if device == 'cuda' else 'fp32'}",
        )
    )
    rows_out.append(
        ("step", f"{args.batch} x N={args.n}, {computed} computed tokens, {step_s:.3f} s")
    )
    rows_out.append(("tokens/s", f"{computed / step_s:,.0f}"))
    rows_out.append(
        ("MFU", f"{tflops / peak:.1%} ({tflops:.0f} TFLOP/s)" if peak else f"{tflops:.2f} TFLOP/s")
    )
    if device == "cuda":
        rows_out.append(("peak GPU memory", f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"))

    # 2. accumulation under ZeRO-3: same global batch, two splits, same starting weights
    results = {}
    for micro, accumulation in ((4, 1), (2, 2)):
        del engine
        engine, _ = build_engine(args, device, micro=micro, accumulation=accumulation)
        rows = alpaca_like_rows(args, 4, random.Random(args.seed + 1))
        results[(micro, accumulation)] = one_step(engine, rows, micro, device)[:2]
    (l1, g1), (l2, g2) = results[(4, 1)], results[(2, 2)]
    tol = 1e-2 if device == "cuda" else 1e-4
    ok = abs(l1 - l2) <= tol * abs(l1) and abs(g1 - g2) <= tol * abs(g1)
    rows_out.append(
        (
            "accumulation 4x1 vs 2x2",
            f"loss {l1:.5f} / {l2:.5f}, grad norm {g1:.4f} / {g2:.4f}: {'OK' if ok else 'MISMATCH'}",
        )
    )

    # 3. export, gathered module by module, vs DeepSpeed's consolidation
    from tuna_ray.train.export import gathered_state_dict

    t0 = time.perf_counter()
    state, stats = gathered_state_dict(engine.module.lm, rank=0, zero_stage=3)
    export_s = time.perf_counter() - t0
    reference = engine._zero3_consolidated_16bit_state_dict()
    same = all(
        torch.equal(state[k], reference["lm." + k].cpu()) for k in state if "lm." + k in reference
    )
    rows_out.append(
        (
            "HF export",
            f"{len(state)} tensors in {export_s:.1f} s, max gathered {stats.max_gathered_params / 1e6:.1f}M of {stats.total_params / 1e6:.0f}M params, equal to DeepSpeed's: {same}",
        )
    )

    width = max(len(k) for k, _ in rows_out)
    print("gpu_check: " + name)
    for key, value in rows_out:
        print(f"  {key:<{width}}  {value}")


if __name__ == "__main__":
    main()
