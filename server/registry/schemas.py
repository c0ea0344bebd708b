"""The bodies of the prompt routes: upload metadata, task and version views. Pydantic only."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any

from pydantic import BaseModel, Field, field_validator

from prompt_store import TaskMetadata, TaskRecord, VersionInfo
from prompt_store.records import INPUT_PLACEHOLDER, MAX_ENSEMBLE_SIZE, Utf8Text
from server.serving.schemas import MAX_LABELS, MAX_TEXT_CHARS, GenerateParameters, StrictModel

MAX_DESCRIPTION_CHARS = 10_000
Label = Annotated[Utf8Text, Field(max_length=MAX_TEXT_CHARS)]


class UploadMetadata(StrictModel):
    """An upload's `metadata` field: `TaskMetadata`'s fields with strict JSON types (`"yes"` is no boolean,
    `true` no number), finite numbers, and nothing serving would refuse later that can be told without the
    server's settings; and whether to activate the new version."""

    labels: list[Label] | None = Field(None, min_length=1, max_length=MAX_LABELS)
    description: Utf8Text | None = Field(None, max_length=MAX_DESCRIPTION_CHARS)
    input_template: Utf8Text | None = Field(
        None, max_length=MAX_TEXT_CHARS, description="`max_template_chars` applies below this ceiling"
    )
    parameters: GenerateParameters | None = None
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

    @classmethod
    def of(cls, record: TaskRecord) -> UploadResponse:
        """The version an upload just added: the record's newest."""
        newest = record.versions[-1]
        fields = newest.model_dump(include={"version", "length", "d_model", "sha256"})
        return cls(task_id=record.task_id, active=record.active_version == newest.version, **fields)


class ActivateRequest(StrictModel):
    version: int = Field(ge=1)


class EnsembleRequest(StrictModel):
    versions: list[Annotated[int, Field(ge=1)]] = Field(
        min_length=1,
        max_length=MAX_ENSEMBLE_SIZE,
        description=f"the task's versions served together (1..{MAX_ENSEMBLE_SIZE}, distinct)",
    )

    @field_validator("versions")
    @classmethod
    def _distinct(cls, versions: list[int]) -> list[int]:
        if len(set(versions)) != len(versions):
            raise ValueError("versions must be distinct")
        return versions


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
    loaded: bool = Field(description="the active prompt is in this replica's device cache now")
    pinned: bool = Field(description="never evicted, on every replica (`PUT /v1/prompts/{task_id}/pin`)")

    @classmethod
    def of(cls, record: TaskRecord, loaded: bool, pinned: bool) -> PromptSummary:
        active = record.version_info(record.active_version) if record.active_version else None
        return cls(
            task_id=record.task_id,
            active_version=record.active_version,
            versions=[v.version for v in record.versions],
            length=active.length if active else None,
            labels=record.metadata.labels,
            updated_at=iso(record.updated_at),
            loaded=loaded,
            pinned=pinned,
        )


class PromptList(BaseModel):
    """One page of the tenant's tasks, by task id; `next_cursor` asks for the next page (null: this is the last)."""

    prompts: list[PromptSummary]
    has_more: bool = False
    next_cursor: str | None = None


class NearToken(BaseModel):
    id: int
    text: str  # the vocabulary piece as the tokenizer spells it (SentencePiece marks a word start with "▁")
    similarity: float  # cosine similarity to the prompt row


class PositionNeighbours(BaseModel):
    position: int
    tokens: list[NearToken]  # nearest first
    labels: list[str]  # the task's labels with a token among `tokens`


class NearestTokens(BaseModel):
    task_id: str
    version: int
    k: int
    positions: list[PositionNeighbours]


class SimilarTask(BaseModel):
    task_id: str
    version: int  # its active version
    similarity: float  # cosine similarity of the mean prompt rows


class SimilarTasks(BaseModel):
    task_id: str
    version: int
    similar: list[SimilarTask]  # most similar first
    compared: int  # the caller's tasks it was compared with (same d_model, with an active version)


class TaskView(BaseModel):
    task_id: str
    active_version: int | None
    labels: list[str] | None
    description: str | None
    input_template: str | None
    parameters: dict[str, Any] | None
    versions: list[VersionView]
    ensemble: list[int]
    created_at: str
    updated_at: str

    @classmethod
    def of(cls, record: TaskRecord) -> TaskView:
        return cls(
            task_id=record.task_id,
            active_version=record.active_version,
            **record.metadata.model_dump(),
            versions=[VersionView.of(v) for v in record.versions],
            ensemble=record.ensemble,
            created_at=iso(record.created_at),
            updated_at=iso(record.updated_at),
        )
