"""Request and response bodies of the HTTP API (api.md). Pydantic only: no FastAPI here."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from prompt_store import TASK_ID_PATTERN, TaskMetadata, TaskRecord, VersionInfo
from prompt_store.records import INPUT_PLACEHOLDER, Utf8Text, text_problem

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


class UploadMetadata(TaskMetadata):
    """An upload's `metadata` field: strict JSON types (`"yes"` is no boolean, `true` no number), finite
    numbers, and nothing serving would refuse later that can be told without the server's settings."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    labels: list[Utf8Text] | None = Field(None, min_length=1, max_length=MAX_LABELS)
    parameters: GenerateParameters | None = None  # type: ignore[assignment]
    activate: bool = True

    @field_validator("labels")
    @classmethod
    def _usable_labels(cls, labels: list[str] | None) -> list[str] | None:
        if labels is not None and not all(labels):
            raise ValueError("a label may not be empty")
        if labels is not None and len(set(labels)) != len(labels):
            raise ValueError("labels must be distinct")
        return labels

    @field_validator("input_template")
    @classmethod
    def _one_input(cls, template: str | None) -> str | None:
        if template is not None and template.count(INPUT_PLACEHOLDER) != 1:
            raise ValueError(f"the template must hold {INPUT_PLACEHOLDER} exactly once (where the input goes)")
        return template

    def task_metadata(self) -> TaskMetadata:
        data = self.model_dump(exclude={"activate"}, exclude_none=True)
        return TaskMetadata.model_validate(data)


class UploadResponse(BaseModel):
    task_id: str
    version: int
    length: int
    d_model: int
    sha256: str
    active: bool


class ActivateRequest(StrictModel):
    version: int = Field(ge=1)


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat()


class VersionView(BaseModel):
    version: int
    length: int
    d_model: int
    sha256: str
    model: str
    created_at: str

    @classmethod
    def of(cls, info: VersionInfo) -> VersionView:
        return cls(**info.model_dump(exclude={"created_at"}), created_at=iso(info.created_at))


class PromptSummary(BaseModel):
    task_id: str
    active_version: int | None
    versions: list[int]
    length: int | None
    labels: list[str] | None
    updated_at: str

    @classmethod
    def of(cls, record: TaskRecord) -> PromptSummary:
        active = record.version_info(record.active_version) if record.active_version else None
        return cls(
            task_id=record.task_id,
            active_version=record.active_version,
            versions=[v.version for v in record.versions],
            length=active.length if active else None,
            labels=record.metadata.labels,
            updated_at=iso(record.updated_at),
        )


class PromptList(BaseModel):
    prompts: list[PromptSummary]


class TaskView(BaseModel):
    task_id: str
    active_version: int | None
    labels: list[str] | None
    description: str | None
    input_template: str | None
    parameters: dict[str, Any] | None
    versions: list[VersionView]
    created_at: str
    updated_at: str

    @classmethod
    def of(cls, record: TaskRecord) -> TaskView:
        return cls(
            task_id=record.task_id,
            active_version=record.active_version,
            **record.metadata.model_dump(),
            versions=[VersionView.of(v) for v in record.versions],
            created_at=iso(record.created_at),
            updated_at=iso(record.updated_at),
        )


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
