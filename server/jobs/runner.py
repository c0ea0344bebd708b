"""`JobRunner`: runs one delivery of a training job, the same way under the in-process thread and RQ.

1. Claim the job (`queued` → `running`, only if the delivery token still matches).
2. Train with `PromptTrainer`, resuming from the stored checkpoint if there is one. Progress is written
   at most every `PROGRESS_WRITE_S` (and at every evaluation); a checkpoint every `checkpoint_every` steps
   is stored together with the record. The stop signal is polled every `POLL_S`: a cancel (or a newer
   delivery) stops the run; a worker shutdown checkpoints at the current step and puts the job back in
   the queue.
3. On success, mark the job `finishing` (no cancel after this point), publish the prompt as a new version
   of the task, and record the version.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

from prompt_store import SoftPrompt, TaskMetadata, TaskRecord
from server.jobs.errors import JobConflict, JobNotFound
from server.jobs.records import (
    JobProgress,
    JobRecord,
    JobState,
    claim,
    failed,
    finishing,
    progressed,
    released,
    succeeded,
)
from server.jobs.store import JobStore
from server.metrics import TrainingMetrics
from server.model import FrozenT5
from server.training import PromptTrainer, TrainingCancelled, TrainingCheckpoint, TrainingResult
from server.training.recipe import MAX_RANK_LABELS

log = logging.getLogger(__name__)

POLL_S = 0.25
PROGRESS_WRITE_S = 0.5
MAX_ERROR_CHARS = 500


class Publisher(Protocol):
    """Registers a prompt as a new version (`PromptStore.add_version`'s signature)."""

    def __call__(
        self, tenant: str, task_id: str, prompt: SoftPrompt, metadata: TaskMetadata | None, activate: bool, model: str
    ) -> TaskRecord: ...


Requeue = Callable[[str, int], None]
Lease = Callable[[str, str], AbstractContextManager[Any]]


def no_lease(job_id: str, holder: str) -> AbstractContextManager[None]:
    return contextlib.nullcontext()


def task_metadata(result: TrainingResult) -> TaskMetadata | None:
    """The train targets become the task's labels (for `/v1/classify`) when they form a small label set."""
    if 2 <= len(result.labels) <= MAX_RANK_LABELS:
        return TaskMetadata(labels=result.labels)
    return None


class JobRunner:
    def __init__(
        self,
        model: FrozenT5,
        store: JobStore,
        publish: Publisher,
        metrics: TrainingMetrics,
        *,
        worker_name: str,
        checkpoint_every: int,
        requeue: Requeue,
        lease: Lease = no_lease,
    ) -> None:
        self.model = model
        self.store = store
        self.publish = publish
        self.metrics = metrics
        self.worker_name = worker_name
        self.checkpoint_every = checkpoint_every
        self.requeue = requeue
        self.lease = lease

    def run(self, job_id: str, attempt: int, stopping: threading.Event) -> JobState | None:
        """Runs delivery `attempt` of the job; returns the state it left the job in (None: not ours)."""
        try:
            record = self.store.update(job_id, lambda r: claim(r, attempt, self.worker_name))
        except (JobNotFound, JobConflict) as error:
            log.info("skipping delivery %d of job %s: %s", attempt, job_id, error)
            return None
        self.metrics.jobs.labels(state="running").inc()
        log.info("job %s (%s/%s): attempt %d on %s", job_id, record.tenant, record.task_id, attempt, self.worker_name)
        with self.lease(job_id, f"{self.worker_name}/{attempt}"):
            try:
                return TrainingRun(self, record, stopping).run()
            except JobConflict as error:  # cancelled, or redelivered elsewhere, while we were busy
                log.info("job %s: stopped: %s", job_id, error)
                return None
            except Exception as error:
                log.exception("job %s failed", job_id)
                return self.fail(record, f"training failed: {type(error).__name__}: {error}")

    def fail(self, record: JobRecord, message: str) -> JobState | None:
        try:
            self.store.update(record.job_id, lambda r: failed(r, record.attempt, message[:MAX_ERROR_CHARS]))
        except JobConflict:
            return None
        self.metrics.jobs.labels(state="failed").inc()
        return JobState.FAILED


class TrainingRun:
    """One delivery's training loop and its callbacks."""

    def __init__(self, runner: JobRunner, record: JobRecord, stopping: threading.Event) -> None:
        self.runner = runner
        self.store = runner.store
        self.record = record
        self.job_id, self.attempt = record.job_id, record.attempt
        self.stopping = stopping
        self.shutdown = False
        self.progress = record.progress
        self.trainer: PromptTrainer | None = None
        self._polled = time.monotonic()
        self._written = time.perf_counter()
        self._step_started = time.perf_counter()

    def run(self) -> JobState | None:
        dataset = self.store.dataset(self.job_id)
        self.trainer = trainer = PromptTrainer(self.runner.model, dataset.train, dataset.eval, self.record.config)
        resume = self._checkpoint()
        if resume is not None:
            log.info("job %s: resuming from step %d", self.job_id, resume.step)
        self._step_started = time.perf_counter()
        try:
            result = trainer.train(
                on_progress=self.on_progress,
                should_stop=self.should_stop,
                checkpoint_every=self.runner.checkpoint_every or None,
                on_checkpoint=self.on_checkpoint,
                resume_from=resume,
            )
        except TrainingCancelled:
            return self._release() if self.shutdown else None
        return self._finish(result)

    def _checkpoint(self) -> TrainingCheckpoint | None:
        data = self.store.load_checkpoint(self.job_id)
        if data is None:
            return None
        try:
            return TrainingCheckpoint.from_bytes(data)
        except Exception:
            log.exception("job %s: unreadable checkpoint; starting over", self.job_id)
            return None

    # Trainer callbacks

    def should_stop(self) -> bool:
        if self.stopping.is_set():
            self.shutdown = True
            return True
        now = time.monotonic()
        if now - self._polled < POLL_S:
            return False
        self._polled = now
        record = self.store.get(self.job_id)
        return record.state != JobState.RUNNING or record.attempt != self.attempt

    def on_progress(self, step: int, loss: float, metrics: dict[str, float] | None) -> None:
        now = time.perf_counter()
        self.runner.metrics.steps.inc()
        if metrics is None:
            self.runner.metrics.step_duration.observe(now - self._step_started)
        self.progress = JobProgress(
            step=step, total_steps=self.progress.total_steps, loss=loss, eval=metrics or self.progress.eval
        )
        if metrics is not None or step == self.progress.total_steps or now - self._written >= PROGRESS_WRITE_S:
            self._save()
        self._step_started = time.perf_counter()

    def on_checkpoint(self, checkpoint: TrainingCheckpoint) -> None:
        self._save(checkpoint)

    def _history(self) -> list[dict[str, Any]]:
        return list(self.trainer.history) if self.trainer is not None else []

    def _save(self, checkpoint: TrainingCheckpoint | None = None) -> JobRecord:
        self._written = time.perf_counter()
        step = checkpoint.step if checkpoint is not None else None
        data = checkpoint.to_bytes() if checkpoint is not None else None
        return self.store.update(
            self.job_id, lambda r: progressed(r, self.attempt, self.progress, self._history(), step), checkpoint=data
        )

    # Endings

    def _release(self) -> JobState:
        assert self.trainer is not None
        checkpoint = self.trainer.checkpoint()
        record = self.store.update(
            self.job_id,
            lambda r: released(
                progressed(r, self.attempt, self.progress, self._history(), checkpoint.step), self.attempt
            ),
            checkpoint=checkpoint.to_bytes(),
        )
        self.runner.requeue(self.job_id, record.attempt)
        self.runner.metrics.jobs.labels(state="queued").inc()
        log.info("job %s: released at step %d for another worker", self.job_id, checkpoint.step)
        return JobState.QUEUED

    def _finish(self, result: TrainingResult) -> JobState | None:
        self.store.update(self.job_id, lambda r: finishing(r, self.attempt))
        record = self.record
        try:
            task = self.runner.publish(
                record.tenant,
                record.task_id,
                result.prompt,
                task_metadata(result),
                record.activate,
                self.runner.model.model_id,
            )
        except Exception as error:
            log.exception("job %s: registering the prompt failed", self.job_id)
            return self.runner.fail(record, f"the prompt could not be registered: {type(error).__name__}: {error}")
        version = task.versions[-1].version
        final = JobProgress(
            step=result.steps_run,
            total_steps=self.progress.total_steps,
            loss=self.progress.loss,
            eval=self.progress.eval,
        )
        self.store.update(
            self.job_id,
            lambda r: succeeded(progressed(r, self.attempt, final, result.history), self.attempt, version),
        )
        self.runner.metrics.jobs.labels(state="succeeded").inc()
        log.info("job %s: succeeded; %s/%s version %d", self.job_id, record.tenant, record.task_id, version)
        return JobState.SUCCEEDED
