"""Prompt templates: the exact Alpaca strings and the tokenizer's chat template."""

from __future__ import annotations

import pytest

from tuna_ray.data.templates import (
    ALPACA_PROMPT_INPUT,
    ALPACA_PROMPT_NO_INPUT,
    TEMPLATE_VERSION,
    record_prompt,
    render_prompt,
    response_separator,
    template_version,
)


@pytest.fixture(scope="module")
def smollm_tokenizer():
    from transformers import AutoTokenizer

    from tuna_ray.models import smollm2_135m_instruct

    return AutoTokenizer.from_pretrained(smollm2_135m_instruct())


def test_alpaca_with_input_exact():
    expected = (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate to French.\n\n### Input:\nGood morning\n\n### Response:"
    )
    assert render_prompt("Translate to French.", "Good morning") == expected


def test_alpaca_without_input_exact():
    expected = (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a colour.\n\n### Response:"
    )
    assert render_prompt("Name a colour.") == expected
    # Whitespace-only input selects the no-input variant too.
    assert render_prompt("Name a colour.", "  \n") == expected


def test_alpaca_constants_end_at_response_header():
    for template in (ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT):
        assert template.endswith("### Response:")
    assert TEMPLATE_VERSION == template_version("alpaca") == "alpaca-v1"


def test_braces_in_instruction_are_kept_verbatim():
    text = render_prompt("Fill {input} and {instruction}", "x{0}")
    assert "### Instruction:\nFill {input} and {instruction}\n\n### Input:\nx{0}\n\n" in text


def test_response_separator():
    assert response_separator("alpaca") == ""
    assert response_separator("chat") == ""
    with pytest.raises(ValueError, match="unknown prompt template"):
        response_separator("vicuna")


def test_chat_template_smollm(smollm_tokenizer):
    text = render_prompt("Name a colour.", template="chat", tokenizer=smollm_tokenizer)
    assert "<|im_start|>user\nName a colour.<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_chat_template_input_and_system(smollm_tokenizer):
    text = render_prompt(
        "Translate.", "Bonjour", template="chat", tokenizer=smollm_tokenizer, system="Be brief."
    )
    assert "Translate.\n\nBonjour" in text
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")
    assert template_version("chat", smollm_tokenizer).startswith("chat-v1-")


def test_chat_template_needs_tokenizer_with_template():
    with pytest.raises(ValueError, match="needs a tokenizer"):
        render_prompt("x", template="chat")

    class Plain:
        chat_template = None
        name_or_path = "base-model"

    with pytest.raises(ValueError, match="'base-model' has none"):
        render_prompt("x", template="chat", tokenizer=Plain())


def test_record_prompt_prefers_instruction_then_prompt():
    assert record_prompt({"instruction": "Hi.", "prompt": "ignored"}) == render_prompt("Hi.")
    assert record_prompt({"instruction": None, "prompt": "RAW"}) == "RAW"
    with pytest.raises(ValueError, match="neither"):
        record_prompt({"id": "a"})
