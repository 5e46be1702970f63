"""OpenAI wire format for the local server: request models and response builders.

Stage: serve. Pure functions from engine results (``tuna_ray.engines.hf.Generation``) to the
JSON bodies of ``/v1/completions`` (legacy ``logprobs`` object: tokens, token_logprobs,
top_logprobs, text_offset) and ``/v1/chat/completions`` (``logprobs.content`` entries with
token, logprob, bytes, top_logprobs), close enough to OpenAI's that the official client parses
them. Unknown request fields (``user``, penalties, ...) are accepted and ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from tuna_ray.engines.hf import Generation

MAX_TOP_LOGPROBS = 20
DEFAULT_CHAT_MAX_TOKENS = 512


class Detokenizer(Protocol):
    def token_text(self, token_id: int) -> str: ...


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    n: int = Field(default=1, ge=1, le=128)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Request):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ChatRequest(_Request):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict[str, Any] | None = None  # {"type": "json_schema", ...}: judge mode

    def plain_messages(self) -> tuple[dict, ...]:
        """Messages with string content (content parts are joined), for the chat template."""
        out = []
        for m in self.messages:
            content = m.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            out.append({"role": m.get("role", "user"), "content": content or ""})
        return tuple(out)


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None):
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_logprobs(
    tok: Detokenizer,
    prompt_text: str,
    gen: Generation,
    *,
    echo: tuple[list[int], list[float | None], list, list[int]] | None = None,
) -> dict:
    """The legacy ``logprobs`` object; ``echo`` = (prompt ids, log-probs, top-k, char starts).

    ``text_offset`` indexes into prompt + completion text, as OpenAI's does.
    """
    tokens, lps, tops, offsets = [], [], [], []
    if echo is not None:
        ids, p_lps, p_tops, starts = echo
        tokens += [tok.token_text(t) for t in ids]
        lps += p_lps
        tops += p_tops or [None] + [[]] * (len(ids) - 1)
        offsets += starts
    position = len(prompt_text)
    for i, token_id in enumerate(gen.token_ids):
        piece = tok.token_text(token_id)
        tokens.append(piece)
        lps.append(gen.token_logprobs[i])
        tops.append(gen.top_logprobs[i] if gen.top_logprobs else [])
        offsets.append(position)
        position += len(piece)
    top_dicts = [
        None if alts is None else {tok.token_text(t): lp for t, lp in alts} for alts in tops
    ]
    return {
        "tokens": tokens,
        "token_logprobs": lps,
        "top_logprobs": top_dicts,
        "text_offset": offsets,
    }


def completion_response(
    model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int
) -> dict:
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }


def _entry(tok: Detokenizer, token_id: int, logprob: float) -> dict:
    text = tok.token_text(token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(tok: Detokenizer, gen: Generation) -> dict:
    content = []
    for i, token_id in enumerate(gen.token_ids):
        entry = _entry(tok, token_id, gen.token_logprobs[i])
        alts = gen.top_logprobs[i] if gen.top_logprobs else []
        entry["top_logprobs"] = [_entry(tok, t, lp) for t, lp in alts]
        content.append(entry)
    return {"content": content, "refusal": None}


def chat_response(
    model: str, tok: Detokenizer, gens: list[Generation], prompt_tokens: int, *, logprobs: bool
) -> dict:
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": g.text, "refusal": None},
            "logprobs": chat_logprobs(tok, g) if logprobs else None,
            "finish_reason": g.finish_reason,
        }
        for i, g in enumerate(gens)
    ]
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, sum(len(g.token_ids) for g in gens)),
    }


def strip_logprobs(body: dict) -> dict:
    """The ``no_logprobs`` fault: a valid response whose choices carry ``logprobs: null``."""
    for choice in body.get("choices", []):
        choice["logprobs"] = None
    return body
