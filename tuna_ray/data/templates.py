"""Prompt templates: the Alpaca template of the paper and a tokenizer's own chat template.

Stage: data. Every stage that turns an instruction into model text (sampling, teacher scoring,
tokenising for training, evaluation) goes through ``render_prompt`` so the text a response was
sampled after is the text it is trained and scored after.

A training sequence is ``prompt + response_separator(template) + response + EOS`` (METHOD.md);
only the response tokens and EOS carry loss.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

Template = Literal["alpaca", "chat"]

ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

# Bump when the rendered text of a template changes, so caches keyed on it (teacher calls,
# tokenised datasets) never serve text rendered under the old template.
ALPACA_TEMPLATE_VERSION = "alpaca-v1"
CHAT_TEMPLATE_VERSION = "chat-v1"
TEMPLATE_VERSION = ALPACA_TEMPLATE_VERSION


def _require_chat_template(tokenizer: Any) -> None:
    if tokenizer is None:
        raise ValueError("template 'chat' needs a tokenizer, got tokenizer=None")
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        raise ValueError(
            f"template 'chat' needs a tokenizer with a chat template; {name!r} has none "
            "(use template 'alpaca' for base models)"
        )


def render_prompt(
    instruction: str,
    input: str = "",  # named like the record field
    *,
    template: Template = "alpaca",
    tokenizer: Any = None,
    system: str | None = None,
) -> str:
    """Render one instruction (and optional input) as the text the model continues.

    ``alpaca``: the paper's template; an input that is empty or whitespace-only selects the
    no-input variant. The prompt ends with ``"### Response:"`` and nothing after it.
    ``chat``: ``tokenizer.apply_chat_template`` with the generation prompt appended; the user
    message is the instruction, plus ``"\\n\\n" + input`` when input is non-empty, preceded by a
    system message when ``system`` is given (otherwise the template's own default applies).

    >>> render_prompt("Say hi.").endswith("### Instruction:\\nSay hi.\\n\\n### Response:")
    True
    """
    has_input = bool(input and input.strip())
    if template == "alpaca":
        if has_input:
            return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input)
        return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    if template == "chat":
        _require_chat_template(tokenizer)
        user = f"{instruction}\n\n{input}" if has_input else instruction
        messages = [{"role": "user", "content": user}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown prompt template {template!r}; expected 'alpaca' or 'chat'")


def response_separator(template: Template) -> str:
    """Text placed between the prompt and the response in a training sequence.

    Both templates use ``""``: the response follows the prompt directly.

    - ``alpaca``: METHOD.md defines a training sequence as prompt + response + EOS, and the
      reference code (LMOps tuna ``train_tuna.py``: ``f"{inst}{out}{eos}"``) and Stanford
      Alpaca's ``train.py`` (``source + target``) concatenate with nothing in between. It also
      keeps sampled answers consistent: an engine samples a continuation of the prompt that
      ends at ``"### Response:"``, so whatever leading whitespace the model chose is already
      part of the response text, and re-scoring or training on ``prompt + response`` sees
      exactly the sampled token sequence. A ``"\\n"`` here would score a different sequence
      than the one sampled.
    - ``chat``: the generation prompt already ends with the assistant header.
    """
    if template in ("alpaca", "chat"):
        return ""
    raise ValueError(f"unknown prompt template {template!r}; expected 'alpaca' or 'chat'")


def template_version(template: Template, tokenizer: Any = None) -> str:
    """A cache key for the rendered text: ``"alpaca-v1"``, or ``"chat-v1-<hash>"`` where the
    hash covers the tokenizer's chat template (a different model renders differently)."""
    if template == "alpaca":
        return ALPACA_TEMPLATE_VERSION
    if template == "chat":
        _require_chat_template(tokenizer)
        digest = hashlib.sha1(str(tokenizer.chat_template).encode("utf-8")).hexdigest()[:12]
        return f"{CHAT_TEMPLATE_VERSION}-{digest}"
    raise ValueError(f"unknown prompt template {template!r}; expected 'alpaca' or 'chat'")


def record_prompt(
    record: dict,
    *,
    template: Template = "alpaca",
    tokenizer: Any = None,
    system: str | None = None,
) -> str:
    """The prompt text of a record dict: rendered from ``instruction``/``input`` when the
    record has an instruction, else its ``prompt`` verbatim (imported pre-rendered data)."""
    instruction = record.get("instruction")
    if instruction is not None:
        return render_prompt(
            instruction,
            record.get("input") or "",
            template=template,
            tokenizer=tokenizer,
            system=system,
        )
    prompt = record.get("prompt")
    if prompt is None:
        raise ValueError(f"record {record.get('id')!r} has neither 'instruction' nor 'prompt'")
    return prompt
