"""The ``vllm`` engine: in-process vLLM on GPU workers through a ``ray.data.llm`` processor.

Stage: engines (Ray shell over pure helpers). Importable without vllm or GPUs: everything that
needs them is imported inside ``build_vllm_processor``; the pure parts below are what CPU tests
cover.

Columns. Input rows: ``id``, ``prompt`` (rendered text) and, to score, ``responses`` (list).
``expand_rows`` turns each into one engine row per sample (``sample_index``) or per response
(``response_index``), because Ray's vLLM stage keeps only ``outputs[0]`` of a request: asking
vLLM for ``n > 1`` in one request would silently drop all samples but the first. Each row asks
for one sample with seed ``seed + sample_index``. Output rows (``parse_vllm_output``):

- sample: ``id, sample_index, text, token_logprobs, error``
- score:  ``id, response_index, logprob_sum, num_tokens, error``

``error`` is "" on success; ``collect_results`` groups rows back per ``id`` into the
``Engine`` shapes (``list[Sample]`` / ``list[Scored]``, or ``EngineError``).

Re-scoring tokenises ``prompt`` and ``response`` separately (the prompt with the model's
special tokens, the response without) and asks vLLM for ``prompt_logprobs`` over the joined ids:
the response's tokens are exactly the ones after ``response_start``.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tuna_ray.engines.base import EngineError, Sample, SamplingParams, Scored

Mode = Literal["sample", "score"]
_OWN_FIELDS = {
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "max_model_len",
    "gpu_memory_utilization",
    "dtype",
}


class VLLMEngineConfig(BaseModel):
    """One vLLM deployment inside a Ray Data stage: model, parallelism, replicas."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str  # hub id or local folder, loaded the ordinary way
    tensor_parallel_size: int = Field(default=1, ge=1)
    pipeline_parallel_size: int = Field(default=1, ge=1)
    replicas: int = Field(default=1, ge=1)  # engine actors (data parallel)
    batch_size: int = Field(default=64, ge=1)
    max_model_len: int | None = Field(default=None, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    dtype: str = "auto"
    accelerator_type: str | None = None  # e.g. "H100"; None = any GPU
    continue_on_error: bool = True  # a failed row becomes an error row, not a failed stage
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _no_shadowed_kwargs(self) -> VLLMEngineConfig:
        clash = _OWN_FIELDS & set(self.engine_kwargs)
        if clash:
            raise ValueError(f"set {sorted(clash)} as config fields, not in engine_kwargs")
        return self

    @property
    def gpus_per_replica(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def total_gpus(self) -> int:
        return self.gpus_per_replica * self.replicas


def engine_processor_kwargs(config: VLLMEngineConfig) -> dict[str, Any]:
    """Keyword arguments for ``ray.data.llm.vLLMEngineProcessorConfig``.

    Prompts arrive rendered (tuna_ray.data.templates), so Ray's chat-template stage is off;
    vLLM tokenises and detokenises by itself, so those CPU stages are off too. ``replicas`` is a
    fixed pool ``(n, n)``: a plain int would let Ray autoscale between 1 and n.
    """
    engine = {
        "tensor_parallel_size": config.tensor_parallel_size,
        "pipeline_parallel_size": config.pipeline_parallel_size,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "dtype": config.dtype,
        **config.engine_kwargs,
    }
    if config.max_model_len is not None:
        engine["max_model_len"] = config.max_model_len
    return {
        "model_source": config.model,
        "engine_kwargs": engine,
        "batch_size": config.batch_size,
        "concurrency": (config.replicas, config.replicas),
        "accelerator_type": config.accelerator_type,
        "should_continue_on_error": config.continue_on_error,
        "chat_template_stage": False,
        "tokenize_stage": False,
        "detokenize_stage": False,
    }


def vllm_sampling_params(params: SamplingParams, mode: Mode, *, sample_index: int = 0) -> dict:
    """The per-row ``sampling_params`` dict (``vllm.SamplingParams`` keyword arguments).

    Sample: one sample with the chosen token's log-prob (``logprobs=0``), seed shifted per
    sample so N rows give N different answers yet rerun identically. Score: no sampling, one
    throw-away token, and the log-prob of every prompt token (``prompt_logprobs=0``).
    """
    if mode == "score":
        return {"n": 1, "temperature": 0.0, "max_tokens": 1, "prompt_logprobs": 0}
    out: dict[str, Any] = {
        "n": 1,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_tokens,
        "logprobs": 0,
    }
    if params.seed is not None:
        out["seed"] = params.seed + sample_index
    if params.stop:
        out["stop"] = list(params.stop)
    return out


def expand_rows(row: dict, params: SamplingParams, mode: Mode) -> list[dict]:
    """One input row → one engine row per sample (sample) or per given response (score)."""
    base = {"id": str(row["id"]), "prompt": str(row["prompt"])}
    if mode == "score":
        return [
            {**base, "response_index": k, "response": str(r)}
            for k, r in enumerate(list(row["responses"]))
        ]
    return [{**base, "sample_index": k} for k in range(params.n)]


def score_token_ids(tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """``(prompt ids + response ids, response_start)`` for prompt-logprob re-scoring."""
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    return prompt_ids + response_ids, len(prompt_ids)


def _as_list(value: Any) -> list | None:
    """Ray Data hands list columns back as numpy arrays; None stays None."""
    return None if value is None else list(value)


def _chosen_logprob(position: Any, token_id: int) -> float | None:
    """The log-prob of ``token_id`` in one position's ``{token_id: {"logprob": ...}}``."""
    if not isinstance(position, dict):
        return None
    entry = position.get(token_id, position.get(str(token_id)))
    value = entry.get("logprob") if isinstance(entry, dict) else None
    return float(value) if isinstance(value, int | float) else None


def parse_vllm_output(row: dict, mode: Mode) -> dict:
    """One engine output row → our output columns (see the module docstring)."""
    if mode == "score":
        out = {"id": row["id"], "response_index": int(row["response_index"])}
        out.update(logprob_sum=0.0, num_tokens=0, error="")
    else:
        out = {"id": row["id"], "sample_index": int(row["sample_index"])}
        out.update(text=str(row.get("generated_text") or ""), token_logprobs=[], error="")
    if row.get("__inference_error__"):
        return {**out, "error": f"vllm: {row['__inference_error__']}"}
    if mode == "score":
        ids = _as_list(row.get("prompt_token_ids"))
        if ids is None:
            ids = _as_list(row.get("tokenized_prompt")) or []
        positions, start = _as_list(row.get("prompt_logprobs")), int(row["response_start"])
        if positions is None or len(positions) != len(ids) or start < 1:
            return {**out, "error": "missing logprobs"}
        values = [_chosen_logprob(positions[i], int(ids[i])) for i in range(start, len(ids))]
    else:
        tokens = _as_list(row.get("generated_tokens")) or []
        positions = _as_list(row.get("logprobs"))
        if positions is None or len(positions) != len(tokens):
            return {**out, "error": "missing logprobs"}
        values = [_chosen_logprob(p, int(t)) for p, t in zip(positions, tokens, strict=True)]
    if any(v is None for v in values):
        return {**out, "error": "missing logprobs"}
    if mode == "score":
        return {**out, "logprob_sum": float(sum(values)), "num_tokens": len(values)}
    return {**out, "token_logprobs": values}


def collect_results(
    rows: list[dict], mode: Mode
) -> dict[str, list[Sample] | list[Scored] | EngineError]:
    """Group output rows by ``id`` (ordered by index); any failed row fails its prompt."""
    index = "response_index" if mode == "score" else "sample_index"
    grouped: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        grouped[str(row["id"])].append(row)
    results: dict[str, Any] = {}
    for pid, group in grouped.items():
        group.sort(key=lambda r: int(r[index]))
        error = next(
            (
                r.get("error") or r.get("__inference_error__")
                for r in group
                if r.get("error") or r.get("__inference_error__")
            ),
            None,
        )
        if error:
            results[pid] = EngineError(str(error), prompt_id=pid)
        elif mode == "score":
            results[pid] = [Scored(float(r["logprob_sum"]), int(r["num_tokens"])) for r in group]
        else:
            results[pid] = [
                Sample(str(r["text"]), [float(v) for v in r["token_logprobs"]]) for r in group
            ]
    return results


def check_gpus_available(num_gpus: float, *, what: str = "the vLLM stage") -> None:
    """Fail fast when the Ray cluster can never give ``num_gpus`` GPUs (unless autoscaling).

    A vLLM stage on a cluster without GPUs waits forever for an actor that never starts.
    Needs Ray to be initialised (``tuna_ray.ray_setup.ensure_ray``).
    """
    from tuna_ray.ray_setup import check_resources

    try:
        check_resources(cpus=0, gpus=num_gpus, what=what)
    except RuntimeError as exc:
        raise RuntimeError(
            f"{what} needs {num_gpus:g} GPU(s) (replicas x tensor_parallel x pipeline_parallel) "
            "and the Ray cluster cannot provide them: run it on a GPU cluster, lower "
            "replicas/tensor_parallel_size, use the hf or openai engine on CPU, or on an "
            "autoscaling cluster set TUNA_RAY_AUTOSCALING=1"
        ) from exc


@functools.lru_cache(maxsize=4)
def _tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def row_functions(config: VLLMEngineConfig, params: SamplingParams, mode: Mode):
    """``(preprocess, postprocess)`` for the processor: rows of ``expand_rows`` in, ours out."""
    model = config.model

    def preprocess(row: dict) -> dict:
        out = dict(row)
        if mode == "score":
            ids, start = score_token_ids(_tokenizer(model), row["prompt"], row["response"])
            out.update(tokenized_prompt=ids, response_start=start)
        index = int(row.get("sample_index", 0))
        out["sampling_params"] = vllm_sampling_params(params, mode, sample_index=index)
        return out

    def postprocess(row: dict) -> dict:
        return parse_vllm_output(row, mode)

    return preprocess, postprocess


def build_vllm_processor(
    config: VLLMEngineConfig, params: SamplingParams, *, mode: Mode = "sample"
):
    """A ``ray.data.llm`` processor over rows from ``expand_rows`` (runs need ray[llm] + vllm).

    Building works without vllm (Ray imports it only inside the engine actor), which is how
    CPU tests check that our kwargs are what this Ray version accepts.
    """
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    processor_config = vLLMEngineProcessorConfig(**engine_processor_kwargs(config))
    preprocess, postprocess = row_functions(config, params, mode)
    return build_processor(processor_config, preprocess=preprocess, postprocess=postprocess)


def run_vllm(ds, config: VLLMEngineConfig, params: SamplingParams, *, mode: Mode = "sample"):
    """Input rows (``id, prompt[, responses]``) → output rows; checks for GPUs first."""
    check_gpus_available(config.total_gpus)
    processor = build_vllm_processor(config, params, mode=mode)
    return processor(ds.flat_map(lambda row: expand_rows(row, params, mode)))
