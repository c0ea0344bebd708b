"""Request and response bodies of the HTTP API (api.md). Pydantic only: no FastAPI here."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from prompt_store import TASK_ID_PATTERN, TaskMetadata, TaskRecord, VersionInfo

MAX_LABELS = 64


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class GenerateParameters(StrictModel):
    max_new_tokens: int = Field(20, ge=1)
    num_beams: int = Field(1, ge=1, le=16)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0, le=100)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)


class GenerateRequest(StrictModel):
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


class ClassifyRequest(StrictModel):
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
    model_config = ConfigDict(extra="forbid")
    labels: list[str] | None = Field(None, min_length=1, max_length=MAX_LABELS)
    parameters: GenerateParameters | None = None  # type: ignore[assignment]
    activate: bool = True

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
