"""Request and response bodies of `/v1/training-jobs` (docs/api.md, "Training"). Pydantic only."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from prompt_store import TASK_ID_PATTERN
from server.jobs.records import HistoryEntry, JobProgress, JobRecord, JobState
from server.registry.schemas import iso
from server.serving.schemas import MAX_TEXT_CHARS
from server.training import TrainingConfig


class JobOptions(BaseModel):
    """Everything of a submission but the examples (a JSON body's other fields, or the multipart form's)."""

    model_config = ConfigDict(extra="forbid")

    task_id: str = Field(pattern=TASK_ID_PATTERN)
    config: TrainingConfig = Field(default_factory=lambda: TrainingConfig())
    activate: bool = Field(True, description="serve the trained prompt as the task's active version")


class ExampleBody(BaseModel):
    input: str = Field(max_length=MAX_TEXT_CHARS)
    target: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)


class TrainingJobRequest(JobOptions):
    """The JSON body (documentation: the examples are checked one by one so errors can name the item). Its size
    and values are bounded like every JSON body's (`max_json_body_bytes`, `max_json_values`): a larger training
    set goes as a multipart form of JSONL files."""

    train: list[ExampleBody] = Field(min_length=1)
    eval: list[ExampleBody] | None = None


class JobAccepted(BaseModel):
    job_id: str
    state: JobState


class JobView(BaseModel):
    job_id: str
    task_id: str
    state: JobState
    progress: JobProgress
    history: list[HistoryEntry]
    prompt_version: int | None
    error: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None

    @classmethod
    def of(cls, record: JobRecord) -> JobView:
        return cls(
            job_id=record.job_id,
            task_id=record.task_id,
            state=record.state,
            progress=record.progress,
            history=record.history,
            prompt_version=record.prompt_version,
            error=record.error,
            created_at=iso(record.created_at),
            started_at=iso(record.started_at) if record.started_at is not None else None,
            finished_at=iso(record.finished_at) if record.finished_at is not None else None,
        )


class JobList(BaseModel):
    jobs: list[JobView]
