"""A training job's record and the state transitions every store applies atomically.

States: `queued` → `running` → `succeeded` | `failed` | `cancelled` (a queued job may also be cancelled).
Two internal fields make redelivery safe:
- `attempt`, a delivery token: every (re)queue bumps it, and a worker acts on a job only while the record
  still carries the token of the delivery it got. A stale delivery (a worker thought dead, a duplicate
  queue entry) therefore finds a conflict and stops instead of training the job twice.
- `lost`, how many times the worker running the job disappeared; at `max_attempts` the job fails.

Each transition is a pure function `JobRecord -> JobRecord` that raises `JobConflict` when it does not apply;
a store runs it inside its atomic read-modify-write (`JobStore.update`).

Every record is validated whenever it changes, and no stored number may be NaN or infinite (JSON has none:
`json.dumps` would write them as `null`, which no longer validates), so what a store writes reads back equal.
"""

from __future__ import annotations

import time
import uuid
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from prompt_store.records import Utf8Text
from server.jobs.errors import JobConflict
from server.training import TrainingConfig


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


# The values of `softserve_training_jobs_total{state}` (metric labels are the plain strings).
JOB_STATES = tuple(state.value for state in JobState)


class Stored(BaseModel):
    """A part of a job record: finite numbers only, and revalidated when built from another record's parts."""

    model_config = ConfigDict(allow_inf_nan=False, revalidate_instances="always")


class JobProgress(Stored):
    step: int = 0
    total_steps: int
    loss: float | None = None
    eval: dict[Utf8Text, float] | None = None


class HistoryEntry(Stored):
    """An entry of the trainer's `history`, written at every evaluation step (and the last step)."""

    step: int
    loss: float = Field(description="mean train loss since the previous entry")
    eval: dict[Utf8Text, float] | None = None


class JobRecord(Stored):
    job_id: Utf8Text
    tenant: Utf8Text
    task_id: Utf8Text
    state: JobState = JobState.QUEUED
    config: TrainingConfig
    activate: bool = True
    progress: JobProgress
    history: list[HistoryEntry] = Field(default_factory=list)
    prompt_version: int | None = None
    error: Utf8Text | None = None
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: float = Field(default_factory=time.time)
    # Internal (not in the API view): redelivery bookkeeping, who runs it, the last checkpoint.
    attempt: int = 1
    lost: int = 0
    worker: Utf8Text | None = None
    checkpoint_step: int | None = None
    finishing: bool = False

    @property
    def terminal(self) -> bool:
        return self.state.terminal

    def changed(self, **fields: Any) -> JobRecord:
        """A validated copy (`model_copy` would not validate: a NaN loss would reach the store unchecked)."""
        current = {name: getattr(self, name) for name in type(self).model_fields}
        return type(self).model_validate({**current, **fields, "updated_at": time.time()})


def new_job_id() -> str:
    return uuid.uuid4().hex


JOB_ID_PATTERN = r"^[0-9a-f]{32}$"


def new_record(tenant: str, task_id: str, config: TrainingConfig, activate: bool) -> JobRecord:
    return JobRecord(
        job_id=new_job_id(),
        tenant=tenant,
        task_id=task_id,
        config=config,
        activate=activate,
        progress=JobProgress(total_steps=config.steps * config.ensemble_size),  # an ensemble's members in turn
    )


def _owned(record: JobRecord, attempt: int) -> None:
    """The delivery `attempt` still owns the running job."""
    if record.state != JobState.RUNNING or record.attempt != attempt:
        raise JobConflict(f"job {record.job_id} is {record.state.value} (attempt {record.attempt}), not ours")


def claim(record: JobRecord, attempt: int, worker: str) -> JobRecord:
    if record.state != JobState.QUEUED or record.attempt != attempt:
        raise JobConflict(f"job {record.job_id} is {record.state.value} (attempt {record.attempt}); delivery {attempt}")
    return record.changed(state=JobState.RUNNING, worker=worker, started_at=record.started_at or time.time())


def progressed(
    record: JobRecord,
    attempt: int,
    progress: JobProgress,
    history: list[dict[str, Any]],
    checkpoint_step: int | None = None,
) -> JobRecord:
    _owned(record, attempt)
    checkpoint = checkpoint_step if checkpoint_step is not None else record.checkpoint_step
    return record.changed(progress=progress, history=history, checkpoint_step=checkpoint)


def finishing(record: JobRecord, attempt: int) -> JobRecord:
    """The point of no return: the prompt is about to be registered, so the job can no longer be cancelled."""
    _owned(record, attempt)
    return record.changed(finishing=True)


def succeeded(record: JobRecord, attempt: int, version: int) -> JobRecord:
    _owned(record, attempt)
    return record.changed(state=JobState.SUCCEEDED, prompt_version=version, finished_at=time.time())


def failed(record: JobRecord, attempt: int, error: str) -> JobRecord:
    _owned(record, attempt)
    return record.changed(state=JobState.FAILED, error=error, finished_at=time.time())


def released(record: JobRecord, attempt: int) -> JobRecord:
    """Its worker is shutting down: back to the queue under a new delivery token, resuming later."""
    _owned(record, attempt)
    return record.changed(state=JobState.QUEUED, attempt=record.attempt + 1, worker=None, finishing=False)


def cancelled(record: JobRecord) -> JobRecord:
    if record.terminal:
        raise JobConflict(f"job {record.job_id} has already {record.state.value}")
    if record.finishing:
        raise JobConflict(f"job {record.job_id} has finished training and is registering its prompt")
    return record.changed(state=JobState.CANCELLED, finished_at=time.time(), worker=None)


def abandoned(record: JobRecord, seen: JobRecord, max_attempts: int, reason: str) -> JobRecord:
    """Its worker is gone: requeue under a new token (resuming from the last checkpoint), or fail for good.

    Applies only if the record is still as `seen` when the worker was judged gone (a claim or a progress
    write since then proves a worker alive).
    """
    if record.terminal or record.attempt != seen.attempt or record.updated_at != seen.updated_at:
        raise JobConflict(f"job {record.job_id} changed meanwhile")
    lost = record.lost + (record.state == JobState.RUNNING)
    if lost >= max_attempts:
        error = f"{reason}; the job was lost {lost} time(s), the limit is {max_attempts} attempt(s)"
        return record.changed(state=JobState.FAILED, error=error, lost=lost, finished_at=time.time(), worker=None)
    return record.changed(state=JobState.QUEUED, attempt=record.attempt + 1, lost=lost, worker=None, finishing=False)
