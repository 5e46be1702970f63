"""The record schema shared by every stage (DESIGN.md "Records"), and its typed error.

Stage: data. Records travel between stages as plain dicts (``model_dump()`` of these models)
so Ray Data, JSONL and Parquet carry them unchanged; the models are the single place that
says which dicts are valid.

Unknown fields are ignored on read (``extra="ignore"``) so files written by other tools load.

Validation failures carry a *kind* (the ``type`` of the pydantic error) that readers count:
``missing_field``, ``wrong_type``, ``bad_value``, ``empty_field``, ``too_few_responses``,
``empty_response``, ``length_mismatch``, ``missing_prompt`` (plus ``duplicate_id``,
``bad_utf8``, ``bad_json`` from the readers).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

Ranking = Literal["probabilistic", "contextual", "reference", "sft"]
DEFAULT_MIN_RESPONSES = 2


class RecordError(ValueError):
    """A record that cannot be used, with where it came from.

    ``line`` is the 1-based line of a JSON-lines file (``unit="line"``) or the 1-based index
    of a row in a JSON array, Parquet file or HF dataset (``unit="row"``).

    >>> str(RecordError("needs at least 2 non-empty answers, got 1", path="data/x.jsonl",
    ...     line=7, field="responses", record_id="abc", kind="too_few_responses"))
    "data/x.jsonl line 7, field 'responses': needs at least 2 non-empty answers, got 1 (id=abc)"
    """

    def __init__(
        self,
        reason: str,
        *,
        path: str | None = None,
        line: int | None = None,
        unit: Literal["line", "row"] = "line",
        field: str | None = None,
        record_id: str | None = None,
        kind: str = "invalid",
    ) -> None:
        self.reason = reason
        self.path = path
        self.line = line
        self.unit = unit
        self.field = field
        self.record_id = record_id
        self.kind = kind
        super().__init__(str(self))

    def __str__(self) -> str:
        where = " ".join(
            part
            for part in (
                self.path,
                f"{self.unit} {self.line}" if self.line is not None else None,
            )
            if part
        )
        if self.field:
            where = f"{where}, field '{self.field}'" if where else f"field '{self.field}'"
        text = f"{where}: {self.reason}" if where else self.reason
        if self.record_id is not None:
            text += f" (id={self.record_id})"
        return text

    def __reduce__(self):  # keep the context when pickled across Ray workers
        return (
            _rebuild_record_error,
            (self.reason, self.path, self.line, self.unit, self.field, self.record_id, self.kind),
        )


def _rebuild_record_error(reason, path, line, unit, field, record_id, kind) -> RecordError:
    return RecordError(
        reason, path=path, line=line, unit=unit, field=field, record_id=record_id, kind=kind
    )


def _fail(kind: str, message: str, field: str | None = None) -> PydanticCustomError:
    return PydanticCustomError(kind, message, {"field": field} if field else None)


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str

    @field_validator("id", mode="before")
    @classmethod
    def _id_as_text(cls, value: Any) -> Any:
        # Ids are often integers in public datasets (the reference code's are); keep them as
        # text so every stage compares them the same way. Booleans are not ids.
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return value

    @field_validator("id")
    @classmethod
    def _id_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise _fail("empty_field", "id is empty")
        return value

    @field_validator("input", mode="before", check_fields=False)
    @classmethod
    def _input_none_is_empty(cls, value: Any) -> Any:
        # Parquet/HF columns store a missing input as null.
        return "" if value is None else value


class InstructionRecord(_Record):
    """An instruction to answer: ``id, instruction, input, reference, source``."""

    instruction: str
    input: str = ""
    reference: str | None = None
    source: str | None = None

    @field_validator("instruction")
    @classmethod
    def _instruction_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise _fail("empty_field", "instruction is empty or whitespace-only")
        return value


class RankedRecord(_Record):
    """Responses to one prompt, best first.

    ``instruction``/``input`` are rendered with the configured template; when ``instruction``
    is None, ``prompt`` (already rendered, e.g. imported from the reference format) is used
    verbatim. ``scores`` (higher is better) are optional; when given they align with
    ``responses``. The minimum number of responses comes from the validation context
    ``{"min_responses": n}`` (default 2; SFT data uses 1).
    """

    instruction: str | None = None
    input: str = ""
    prompt: str | None = None
    responses: list[str]
    scores: list[float] | None = None
    ranking: Ranking | None = None
    judge_raw: str | None = None
    source: str | None = None
    # the sampling stage's candidates carry these to contextual ranking: the dataset's own
    # answer (ranked with the samples, ``include_original``) and the model that sampled
    reference: str | None = None
    generator: str | None = None

    @field_validator("responses")
    @classmethod
    def _responses_usable(cls, value: list[str], info: ValidationInfo) -> list[str]:
        context = info.context or {}
        minimum = int(context.get("min_responses", DEFAULT_MIN_RESPONSES))
        for index, text in enumerate(value):
            if not text.strip():
                raise _fail(
                    "empty_response",
                    f"answer {index} is empty or whitespace-only",
                    f"responses[{index}]",
                )
        if len(value) < minimum:
            noun = "answer" if minimum == 1 else "answers"
            raise _fail(
                "too_few_responses",
                f"needs at least {minimum} non-empty {noun}, got {len(value)}",
            )
        return value

    @field_validator("scores")
    @classmethod
    def _scores_not_nan(cls, value: list[float] | None) -> list[float] | None:
        for index, score in enumerate(value or []):
            if math.isnan(score):
                raise _fail("bad_value", f"score {index} is NaN", f"scores[{index}]")
        return value

    @model_validator(mode="after")
    def _prompt_and_scores_consistent(self) -> RankedRecord:
        if self.instruction is None and not (self.prompt and self.prompt.strip()):
            raise _fail(
                "missing_prompt", "needs 'instruction' or a non-empty 'prompt'", "instruction"
            )
        if self.instruction is not None and not self.instruction.strip():
            raise _fail("empty_field", "instruction is empty or whitespace-only", "instruction")
        if self.scores is not None and len(self.scores) != len(self.responses):
            raise _fail(
                "length_mismatch",
                f"has {len(self.scores)} scores for {len(self.responses)} responses",
                "scores",
            )
        return self


_WRONG_TYPE_SUFFIXES = ("_type", "_parsing", "_fraction", "is_instance_of")


def error_from_validation(exc: ValidationError) -> tuple[str, str | None, str]:
    """(kind, field, reason) of the first problem in a pydantic ``ValidationError``."""
    first = exc.errors(include_url=False)[0]
    kind = first["type"]
    field = (first.get("ctx") or {}).get("field")
    if field is None and first["loc"]:
        field = "".join(
            f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"]
        ).lstrip(".")
    if kind == "missing":
        return "missing_field", field, "is required but missing"
    if kind.endswith(_WRONG_TYPE_SUFFIXES):
        got = type(first.get("input")).__name__
        expected = first["msg"].replace("Input should be", "should be", 1)
        return "wrong_type", field, f"{expected}, got {got}"
    if kind == "literal_error":
        return "bad_value", field, first["msg"].replace("Input should be", "should be", 1)
    return kind, field, first["msg"]
