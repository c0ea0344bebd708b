"""The bodies of generate and classify requests and responses, and the decoding parameters. Pydantic only."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from prompt_store import TASK_ID_PATTERN
from prompt_store.records import text_problem

MAX_LABELS = 64
MIN_TEMPERATURE = 1e-2


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class GenerateParameters(StrictModel):
    max_new_tokens: int = Field(20, ge=1)
    num_beams: int = Field(1, ge=1, le=16)
    do_sample: bool = False
    temperature: float = Field(
        1.0,
        ge=MIN_TEMPERATURE,
        le=100,
        description=f"sampling temperature, at least {MIN_TEMPERATURE:g}: below it sampling is greedy in all but "
        "name and dividing the scores by it can overflow (use `do_sample: false` for greedy)",
    )
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    ignore_eos: bool = Field(
        False, description="go on past end-of-sequence until `max_new_tokens` (benchmarks: lengths exactly as asked)"
    )


def unicode_texts(texts: str | list[str] | None) -> str | list[str] | None:
    """Inputs and labels go to the tokenizer: each must be valid Unicode (`text_problem`)."""
    for i, text in enumerate([texts] if isinstance(texts, str) else texts or []):
        problem = text_problem(text)
        if problem:
            raise ValueError(problem if isinstance(texts, str) else f"item {i} {problem}")
    return texts


class TextRequest(StrictModel):
    """Inputs and labels go to the tokenizer: they must be valid Unicode."""

    _unicode = field_validator("inputs", "labels", check_fields=False)(unicode_texts)


class GenerateRequest(TextRequest):
    task_id: str = Field(pattern=TASK_ID_PATTERN)
    inputs: str | list[str] = Field(description="one input, or a list (each is one batch row)")
    version: int | None = Field(None, ge=1, description="pin a prompt version; default: the active one")
    parameters: GenerateParameters | None = None
    stream: bool = Field(
        False, description="answer `text/event-stream`: one event per token, then a final event (one input only)"
    )


class GenerateOutput(BaseModel):
    text: str
    num_tokens: int
    finish_reason: str


class GenerateResponse(BaseModel):
    task_id: str
    prompt_version: int
    outputs: list[GenerateOutput]


class ClassifyRequest(TextRequest):
    task_id: str = Field(pattern=TASK_ID_PATTERN)
    inputs: str | list[str]
    labels: list[str] | None = Field(None, min_length=1, max_length=MAX_LABELS)
    version: int | None = Field(None, ge=1)
    length_normalize: bool = False


class ClassifyOutput(BaseModel):
    label: str
    scores: dict[str, float]
    probs: dict[str, float]


class ClassifyResponse(BaseModel):
    task_id: str
    prompt_version: int
    outputs: list[ClassifyOutput]
