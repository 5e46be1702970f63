"""Engine selection by config: ``engine.kind`` picks the backend, the rest configures it.

engine: {kind: openai, base_url: https://api.openai.com/v1, model: gpt-4o-mini, qps: 5}
engine: {kind: hf, model: builtin:smollm2-135m-instruct}
engine: {kind: vllm, model: meta-llama/Llama-2-7b-hf, tensor_parallel_size: 2}
(one engine per Ray Data actor: the stage's ``scaling.actors`` are the replicas)
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from tuna_ray.engines.openai_engine import OpenAIEngineConfig
from tuna_ray.engines.vllm_engine import VLLMEngineConfig


class OpenAIEngineSpec(OpenAIEngineConfig):
    kind: Literal["openai"] = "openai"


class VLLMEngineSpec(VLLMEngineConfig):
    kind: Literal["vllm"] = "vllm"


class HFEngineSpec(BaseModel):
    """A transformers model in each Ray Data actor (CPU runs, small GPU runs)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["hf"] = "hf"
    model: str
    device: str = "cpu"
    dtype: str | None = None
    batch_size: int = Field(default=8, ge=1)


EngineConfig = Annotated[
    OpenAIEngineSpec | HFEngineSpec | VLLMEngineSpec, Field(discriminator="kind")
]


def _openai_by_default(value):
    """A judge section without ``kind`` is an OpenAI-compatible endpoint (the common case)."""
    if isinstance(value, dict) and "kind" not in value:
        return {"kind": "openai", **value}
    return value


# A judge: an OpenAI-compatible endpoint, or a self-hosted model on vLLM (structured output).
JudgeEngineConfig = Annotated[
    OpenAIEngineSpec | VLLMEngineSpec,
    BeforeValidator(_openai_by_default),
    Field(discriminator="kind"),
]


def build_engine(spec: OpenAIEngineSpec | HFEngineSpec | VLLMEngineSpec):
    """An Engine for the stages' Ray Data actors: one per actor, serving every pass."""
    if isinstance(spec, OpenAIEngineSpec):
        from tuna_ray.engines.openai_engine import OpenAIEngine

        return OpenAIEngine(OpenAIEngineConfig(**spec.model_dump(exclude={"kind"})))
    if isinstance(spec, HFEngineSpec):
        from tuna_ray.engines.hf import HFEngine

        return HFEngine(
            spec.model, device=spec.device, dtype=spec.dtype, batch_size=spec.batch_size
        )
    from tuna_ray.engines.vllm_engine import VLLMEngine

    return VLLMEngine(VLLMEngineConfig(**spec.model_dump(exclude={"kind"})))
