"""Validate OpenAI-compatible JSON responses into plain dicts, or raise ``BadResponse``.

Stage: engines (pure, no network). A response that lacks what was asked for, log-probs above
all, is a failure to retry, never a score: a missing log-prob must not turn into 0.0. Parsed
values are plain JSON so the cache can store them as they are:

- sample: ``[{"text": str, "token_logprobs": [float] | None, "finish_reason": str | None}]``
- score:  ``{"logprob_sum": float, "num_tokens": int}`` (one per echoed prompt)

An answer's log-probs are those of its own tokens, **EOS excluded** (the definition every engine
keeps, see engines/hf.py): a server that lists the token it stopped at (vLLM reports EOS as a
last entry whose text is ``""`` or a special token such as ``</s>``; OpenAI does not) has that
entry dropped (``_without_stop_token``).

>>> raw = {"choices": [{"index": 0, "text": " Paris", "finish_reason": "stop",
...        "logprobs": {"token_logprobs": [-0.5], "tokens": [" Paris"]}}]}
>>> parse_completions(raw, 1)
[{'text': ' Paris', 'token_logprobs': [-0.5], 'finish_reason': 'stop'}]
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Any


class BadResponse(ValueError):
    """A 200 response that is not what was asked for; ``reason`` names what is wrong."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


MALFORMED = "malformed response"
MISSING_LOGPROBS = "missing logprobs"
# How servers print a special token (</s>, <|endoftext|>, <|eot_id|>, <end_of_turn>, ...).
_SPECIAL_TOKEN = re.compile(r"<\|?[^<>\s]+\|?>")


def parse_usage(raw: dict) -> tuple[int, int]:
    """``(prompt_tokens, completion_tokens)``; zeros when the server reports none."""
    usage = raw.get("usage")
    if not isinstance(usage, dict):
        return 0, 0
    counts = []
    for name in ("prompt_tokens", "completion_tokens"):
        value = usage.get(name)
        counts.append(value if isinstance(value, int) and value >= 0 else 0)
    return counts[0], counts[1]


def _choices(raw: dict, n: int) -> list[dict]:
    choices = raw.get("choices")
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise BadResponse(MALFORMED, "no choices list")
    if len(choices) != n:
        raise BadResponse(MALFORMED, f"{len(choices)} choices for n={n}")
    if all(isinstance(c.get("index"), int) for c in choices):
        choices = sorted(choices, key=lambda c: c["index"])
    return choices


def _logprob_list(values: Any, text: str) -> list[float]:
    """Finite floats, one per token; empty only for an empty answer."""
    if not isinstance(values, list) or (not values and text):
        raise BadResponse(MISSING_LOGPROBS)
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise BadResponse(MISSING_LOGPROBS, f"token log-prob {v!r}")
        out.append(float(v))
    return out


def parse_chat(raw: dict, n: int, *, require_logprobs: bool) -> list[dict]:
    """Chat completions: ``choices[i].message.content`` and ``.logprobs.content[j].logprob``."""
    samples = []
    for choice in _choices(raw, n):
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else None
        if not isinstance(text, str):
            raise BadResponse(MALFORMED, "choice without message content")
        token_logprobs = None
        if require_logprobs:
            logprobs = choice.get("logprobs")
            content = logprobs.get("content") if isinstance(logprobs, dict) else None
            if isinstance(content, list) and not all(isinstance(t, dict) for t in content):
                raise BadResponse(MISSING_LOGPROBS, "logprobs.content entries are not objects")
            values = [t.get("logprob") for t in content] if isinstance(content, list) else None
            tokens = [t.get("token") for t in content] if isinstance(content, list) else None
            token_logprobs = _without_stop_token(
                _logprob_list(values, text), tokens, text, choice.get("finish_reason")
            )
        finish = choice.get("finish_reason")
        samples.append({"text": text, "token_logprobs": token_logprobs, "finish_reason": finish})
    return samples


def parse_completions(raw: dict, n: int) -> list[dict]:
    """Legacy completions: ``choices[i].text`` and ``.logprobs.token_logprobs``."""
    samples = []
    for choice in _choices(raw, n):
        text = choice.get("text")
        if not isinstance(text, str):
            raise BadResponse(MALFORMED, "choice without text")
        logprobs = choice.get("logprobs")
        values = logprobs.get("token_logprobs") if isinstance(logprobs, dict) else None
        tokens = logprobs.get("tokens") if isinstance(logprobs, dict) else None
        finish = choice.get("finish_reason")
        samples.append(
            {
                "text": text,
                "token_logprobs": _without_stop_token(
                    _logprob_list(values, text), tokens, text, finish
                ),
                "finish_reason": finish,
            }
        )
    return samples


def _without_stop_token(
    values: list[float], tokens: Any, text: str, finish_reason: Any
) -> list[float]:
    """``values`` without a last entry for the EOS token the answer stopped at.

    Only when the server says it stopped (``finish_reason == "stop"``) and names the last token
    as something the answer does not end with: ``""`` (a special token with special tokens
    skipped) or a special token's spelling. An answer's real last token is never dropped.

    >>> _without_stop_token([-1.0, -0.5], ["Hi", "</s>"], "Hi", "stop")
    [-1.0]
    >>> _without_stop_token([-1.0, -0.5], ["Hi", "!"], "Hi!", "stop")
    [-1.0, -0.5]
    """
    if finish_reason != "stop" or not values or not isinstance(tokens, list):
        return values
    if len(tokens) != len(values) or not isinstance(tokens[-1], str):
        return values
    last = tokens[-1]
    if last == "" or (_SPECIAL_TOKEN.fullmatch(last) and not text.endswith(last)):
        return values[:-1]
    return values


def parse_echo_scores(raw: dict, boundary: int, ends: list[int]) -> list[dict]:
    """One score per echoed prompt ``prompt + response_k`` (a request with a list of prompts,
    ``n=1``): choice k scores characters ``[boundary, ends[k])`` (``parse_echo_score``)."""
    return [_echo_score(c, boundary, end) for c, end in zip(_choices(raw, len(ends)), ends)]


def parse_echo_score(raw: dict, boundary: int, end: int) -> dict:
    """Sum the log-probs of the echoed tokens that cover characters ``[boundary, end)``.

    The request was ``prompt + response`` with ``echo=True``; ``text_offset`` gives each token's
    first character in that text. Token i spans up to the next token's offset, and it counts
    when that span reaches past ``boundary`` (a token straddling the join belongs to the
    response: the response cannot be produced without it) and starts before ``end`` (tokens a
    server generated beyond the echo are ignored).
    """
    choices = raw.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise BadResponse(MALFORMED, "no choices list")
    return _echo_score(choices[0], boundary, end)


def _echo_score(choice: dict, boundary: int, end: int) -> dict:
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        raise BadResponse(MISSING_LOGPROBS)
    offsets, values = logprobs.get("text_offset"), logprobs.get("token_logprobs")
    if not isinstance(offsets, list) or not isinstance(values, list) or len(offsets) != len(values):
        raise BadResponse(MISSING_LOGPROBS, "text_offset and token_logprobs do not line up")
    if not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) or any(
        b < a for a, b in itertools.pairwise(offsets)
    ):
        raise BadResponse(MALFORMED, "text_offset is not a non-decreasing list of ints")
    picked = []
    for i, start in enumerate(offsets):
        stop = offsets[i + 1] if i + 1 < len(offsets) else end
        if start < end and stop > boundary:
            picked.append(values[i])
    if boundary < end and not picked:
        raise BadResponse(MISSING_LOGPROBS, "no echoed tokens cover the response")
    token_logprobs = _logprob_list(picked, "")
    return {"logprob_sum": float(sum(token_logprobs)), "num_tokens": len(token_logprobs)}
