"""The vllm engine's pure parts on CPU: config → processor kwargs, rows in and out, GPU check."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from pydantic import ValidationError

from tuna_ray.engines.base import EngineError, Sample, SamplingParams, Scored
from tuna_ray.engines.vllm_engine import (
    VLLMEngineConfig,
    collect_results,
    engine_processor_kwargs,
    expand_rows,
    parse_vllm_output,
    row_functions,
    score_token_ids,
    vllm_sampling_params,
)


def test_module_imports_without_vllm():
    code = (
        "import sys, tuna_ray.engines.vllm_engine as m; "
        "assert 'vllm' not in sys.modules and 'ray.data.llm' not in sys.modules; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_config_validates():
    with pytest.raises(ValidationError):
        VLLMEngineConfig(model="m", replicas=0)
    with pytest.raises(ValidationError):
        VLLMEngineConfig(model="m", unknown=1)
    with pytest.raises(ValidationError, match="tensor_parallel_size"):
        VLLMEngineConfig(model="m", engine_kwargs={"tensor_parallel_size": 2})
    cfg = VLLMEngineConfig(model="m", tensor_parallel_size=2, pipeline_parallel_size=2, replicas=3)
    assert (cfg.gpus_per_replica, cfg.total_gpus) == (4, 12)


def test_processor_kwargs_are_accepted_by_ray():
    from ray.data.llm import vLLMEngineProcessorConfig

    cfg = VLLMEngineConfig(
        model="org/model",
        tensor_parallel_size=2,
        replicas=3,
        batch_size=16,
        max_model_len=4096,
        dtype="bfloat16",
        engine_kwargs={"enable_prefix_caching": True},
    )
    kwargs = engine_processor_kwargs(cfg)
    assert kwargs["concurrency"] == (3, 3)
    assert kwargs["engine_kwargs"] == {
        "tensor_parallel_size": 2,
        "pipeline_parallel_size": 1,
        "gpu_memory_utilization": 0.9,
        "dtype": "bfloat16",
        "max_model_len": 4096,
        "enable_prefix_caching": True,
    }
    built = vLLMEngineProcessorConfig(**kwargs)
    assert built.model_source == "org/model" and built.batch_size == 16
    assert built.engine_kwargs["tensor_parallel_size"] == 2
    assert built.should_continue_on_error is True


def test_sampling_params_per_mode():
    params = SamplingParams(n=3, temperature=0.7, top_p=0.9, max_tokens=20, seed=10, stop=("\n",))
    rows = [vllm_sampling_params(params, "sample", sample_index=k) for k in range(3)]
    assert [r["seed"] for r in rows] == [10, 11, 12]
    assert rows[0] == {
        "n": 1,
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 20,
        "logprobs": 0,
        "seed": 10,
        "stop": ["\n"],
    }
    assert "seed" not in vllm_sampling_params(SamplingParams(seed=None), "sample")
    score = vllm_sampling_params(params, "score")
    assert score["prompt_logprobs"] == 0 and score["temperature"] == 0.0 and score["n"] == 1


def test_expand_rows():
    params = SamplingParams(n=3)
    rows = expand_rows({"id": 7, "prompt": "Q"}, params, "sample")
    assert [(r["id"], r["sample_index"], r["prompt"]) for r in rows] == [
        ("7", 0, "Q"),
        ("7", 1, "Q"),
        ("7", 2, "Q"),
    ]
    scored = expand_rows(
        {"id": "a", "prompt": "Q", "responses": np.array(["x", "y"])}, params, "score"
    )
    assert [(r["response_index"], r["response"]) for r in scored] == [(0, "x"), (1, "y")]


def test_parse_sample_output_picks_chosen_token():
    row = {
        "id": "a",
        "sample_index": 1,
        "generated_text": "hi there",
        "generated_tokens": np.array([5, 9]),
        # logprobs=0 can still carry a top-1 alternative; string keys after serialisation
        "logprobs": [{5: {"logprob": -0.25}}, {"3": {"logprob": -0.1}, "9": {"logprob": -2.0}}],
        "__inference_error__": "",
    }
    out = parse_vllm_output(row, "sample")
    assert out == {
        "id": "a",
        "sample_index": 1,
        "text": "hi there",
        "token_logprobs": [-0.25, -2.0],
        "error": "",
    }
    missing = parse_vllm_output({**row, "logprobs": None}, "sample")
    assert missing["error"] == "missing logprobs"
    wrong = parse_vllm_output(
        {**row, "logprobs": [{5: {"logprob": -0.25}}, {3: {"logprob": -1}}]}, "sample"
    )
    assert wrong["error"] == "missing logprobs"
    failed = parse_vllm_output({**row, "__inference_error__": "CUDA OOM"}, "sample")
    assert failed["error"] == "vllm: CUDA OOM"


def test_parse_score_output_sums_response_tokens():
    row = {
        "id": "a",
        "response_index": 0,
        "prompt_token_ids": [1, 10, 11, 20, 21],
        "prompt_logprobs": [
            None,
            {10: {"logprob": -1.0}},
            {11: {"logprob": -1.0}},
            {20: {"logprob": -0.5}, 99: {"logprob": -0.1}},
            {21: {"logprob": -0.25}},
        ],
        "response_start": 3,
    }
    out = parse_vllm_output(row, "score")
    assert (out["logprob_sum"], out["num_tokens"], out["error"]) == (-0.75, 2, "")
    assert parse_vllm_output({**row, "prompt_logprobs": None}, "score")["error"]
    assert parse_vllm_output({**row, "response_start": 0}, "score")["error"] == "missing logprobs"


def test_collect_results_groups_and_fails_whole_prompt():
    rows = [
        {"id": "a", "sample_index": 1, "text": "y", "token_logprobs": [-2.0], "error": ""},
        {"id": "a", "sample_index": 0, "text": "x", "token_logprobs": [-1.0], "error": ""},
        {"id": "b", "sample_index": 0, "text": "z", "token_logprobs": [-1.0], "error": ""},
        # error rows bypass postprocess: original columns plus Ray's error column
        {"id": "b", "sample_index": 1, "prompt": "Q", "__inference_error__": "boom"},
    ]
    out = collect_results(rows, "sample")
    assert out["a"] == [Sample("x", [-1.0]), Sample("y", [-2.0])]
    assert isinstance(out["b"], EngineError) and "boom" in out["b"].reason
    scored = collect_results(
        [{"id": "c", "response_index": 0, "logprob_sum": -3.0, "num_tokens": 2, "error": ""}],
        "score",
    )
    assert scored["c"] == [Scored(-3.0, 2)]


def test_score_preprocess_tokenises_prompt_and_response(tiny_model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    ids, start = score_token_ids(tok, "Question: 2+2?\nAnswer:", " four")
    assert ids[:start] == tok("Question: 2+2?\nAnswer:")["input_ids"]
    assert ids[start:] == tok(" four", add_special_tokens=False)["input_ids"]

    cfg = VLLMEngineConfig(model=str(tiny_model_path))
    preprocess, _ = row_functions(cfg, SamplingParams(n=2), "score")
    row = expand_rows(
        {"id": "a", "prompt": "Question: 2+2?\nAnswer:", "responses": [" four"]},
        SamplingParams(n=2),
        "score",
    )[0]
    out = preprocess(row)
    assert out["tokenized_prompt"] == ids and out["response_start"] == start
    assert out["sampling_params"]["prompt_logprobs"] == 0


@pytest.fixture(scope="module")
def cpu_ray():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.mark.slow
def test_gpu_check_fails_fast_without_gpus(cpu_ray, monkeypatch):
    from tuna_ray.engines.vllm_engine import check_gpus_available

    monkeypatch.delenv("TUNA_RAY_AUTOSCALING", raising=False)
    with pytest.raises(RuntimeError, match="needs 2 GPU") as info:
        check_gpus_available(2)
    assert "TUNA_RAY_AUTOSCALING=1" in str(info.value)
    check_gpus_available(0)
    monkeypatch.setenv("TUNA_RAY_AUTOSCALING", "1")
    check_gpus_available(2)  # an autoscaler may add GPU nodes: do not refuse


@pytest.mark.slow
def test_processor_builds_on_cpu(cpu_ray, tiny_model_path):
    from tuna_ray.engines.vllm_engine import build_vllm_processor

    cfg = VLLMEngineConfig(model=str(tiny_model_path), replicas=2, batch_size=8)
    processor = build_vllm_processor(cfg, SamplingParams(n=2), mode="sample")
    (stage,) = processor.stages.values()
    assert type(stage).__name__ == "vLLMEngineStage"
    kwargs = stage.fn_constructor_kwargs
    assert kwargs["model"] == str(tiny_model_path) and kwargs["batch_size"] == 8
    assert kwargs["engine_kwargs"]["tensor_parallel_size"] == 1
