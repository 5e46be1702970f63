"""Data stage: the shared record schema, prompt templates, and file readers/writers."""

from tuna_ray.data.readers import (
    ReadResult,
    derive_id,
    export_reference_format,
    read_instructions,
    read_ranked,
    write_jsonl,
    write_parquet,
)
from tuna_ray.data.records import InstructionRecord, RankedRecord, RecordError
from tuna_ray.data.templates import (
    ALPACA_PROMPT_INPUT,
    ALPACA_PROMPT_NO_INPUT,
    TEMPLATE_VERSION,
    record_prompt,
    render_prompt,
    response_separator,
    template_version,
)

__all__ = [
    "ALPACA_PROMPT_INPUT",
    "ALPACA_PROMPT_NO_INPUT",
    "TEMPLATE_VERSION",
    "InstructionRecord",
    "RankedRecord",
    "ReadResult",
    "RecordError",
    "derive_id",
    "export_reference_format",
    "read_instructions",
    "read_ranked",
    "record_prompt",
    "render_prompt",
    "response_separator",
    "template_version",
    "write_jsonl",
    "write_parquet",
]
