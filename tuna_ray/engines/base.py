"""The one engine interface every generation backend implements (openai, hf, vllm).

Stage: engines. Ranking stages only talk to this interface:

- ``sample``: N answers per prompt, each with the log-prob of every sampled token;
- ``score``: the summed log-prob and count of the tokens of *given* answers after a prompt
  (teacher re-scoring of a reference answer).

Prompts are already-rendered text (tuna_ray.data.templates); chat-style engines that need
messages receive them through ``Prompt.messages``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field


class SamplingParams(BaseModel):
    """Sampling parameters, recorded with every generated answer (``generator`` field)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(default=4, ge=1)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(default=512, ge=1)
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Prompt:
    """One request: the rendered text, or chat messages for chat endpoints (or both)."""

    id: str
    text: str | None = None
    messages: tuple[dict, ...] | None = None


@dataclass
class Sample:
    """One generated answer. ``token_logprobs`` is None only when the engine was not asked."""

    text: str
    token_logprobs: list[float] | None
    finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_logprobs or [])

    @property
    def logprob_sum(self) -> float:
        return float(sum(self.token_logprobs or []))


@dataclass
class Scored:
    """Log-likelihood of a given answer after a prompt."""

    logprob_sum: float
    num_tokens: int


@dataclass
class Usage:
    """Token and cost accounting, summed over calls; ``cached`` calls cost nothing."""

    requests: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    retries: int = 0
    failures: dict[str, int] = field(default_factory=dict)


class EngineError(RuntimeError):
    """A request that failed for good (after retries); ``reason`` is kept for the report."""

    def __init__(self, reason: str, *, prompt_id: str | None = None, retryable: bool = False):
        super().__init__(reason if prompt_id is None else f"{prompt_id}: {reason}")
        self.reason = reason
        self.prompt_id = prompt_id
        self.retryable = retryable


class Engine(Protocol):
    """What a ranking stage needs from a backend."""

    name: str  # e.g. "openai:gpt-4o-mini@https://api.openai.com/v1", recorded as ``generator``

    def sample(
        self, prompts: list[Prompt], params: SamplingParams
    ) -> list[list[Sample] | EngineError]:
        """For each prompt, ``params.n`` samples with token log-probs, or the error it ended in."""
        ...

    def score(self, prompt: Prompt, responses: list[str]) -> list[Scored] | EngineError:
        """Summed log-prob and token count of each given response after ``prompt``."""
        ...

    def usage(self) -> Usage: ...
