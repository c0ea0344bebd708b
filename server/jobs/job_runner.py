"""`JobRunner`: runs one delivery of a training job, the same way under the in-process thread and RQ.

1. Claim the next job in the fair order (`server.jobs.fairness`): `queued` → `running`, only if its delivery
   token is still the one read (another worker may have claimed it meanwhile: then the next one).
2. Train with `PromptTrainer`, resuming from the stored checkpoint if there is one. Progress is written
   at most every `PROGRESS_WRITE_S` (and at every evaluation); a checkpoint every `checkpoint_every` steps
   is stored together with the record. The stop signal is polled every `POLL_S`: a cancel (or a newer
   delivery) stops the run; a worker shutdown, or a time slice used up while another tenant's job waits,
   checkpoints at the current step and puts the job back in the queue, to resume there later.
3. On success, mark the job `finishing` (no cancel after this point), publish the prompt as a new version
   of the task (an `ensemble_size` job: each member's, then the members as the task's ensemble), and record the
   version. A run whose loss diverges fails with that reason.
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
from server.jobs.fairness import fair_order, others_waiting
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
from server.serving.model import FrozenT5
from server.training import PromptTrainer, TrainingCancelled, TrainingCheckpoint, TrainingDiverged, TrainingResult
from server.training.ensemble import EnsembleResult, EnsembleTrainer, trainer_for
from server.training.recipe import MAX_RANK_LABELS

log = logging.getLogger(__name__)

POLL_S = 0.25
PROGRESS_WRITE_S = 0.5
MAX_ERROR_CHARS = 500
# Once past its time slice, how often a job looks for another tenant's queued job (it reads every active record).
WAITING_POLL_S = 1.0
SHUTDOWN = "its worker is stopping"
YIELDED = "it yields its time slice to another tenant's queued job"


class Publisher(Protocol):
    """Registers a prompt as a new version (`PromptStore.add_version`'s signature)."""

    def __call__(
        self, tenant: str, task_id: str, prompt: SoftPrompt, metadata: TaskMetadata | None, activate: bool, model: str
    ) -> TaskRecord: ...


class EnsembleSetter(Protocol):
    """Makes versions the task's ensemble (`PromptStore.set_ensemble`'s signature)."""

    def __call__(self, tenant: str, task_id: str, versions: list[int]) -> TaskRecord: ...


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
        time_slice_s: float = 0.0,
        set_ensemble: EnsembleSetter | None = None,
    ) -> None:
        self.model = model
        self.store = store
        self.publish = publish
        self.set_ensemble = set_ensemble  # what an `ensemble_size` job's members become
        self.metrics = metrics
        self.worker_name = worker_name
        self.checkpoint_every = checkpoint_every
        self.requeue = requeue
        self.lease = lease
        self.time_slice_s = time_slice_s

    def run_next(self, stopping: threading.Event) -> JobState | None:
        """Claims the next queued job in the fair order and runs it; returns the state it left the job in
        (None: nothing claimable was queued, or the job stopped being ours)."""
        for candidate in fair_order(self.store.active(), self.store.tenant_turns()):
            record = self._claim(candidate)
            if record is not None:
                self.store.take_turn(record.tenant)
                return self._run(record, stopping)
        return None

    def _claim(self, candidate: JobRecord) -> JobRecord | None:
        try:
            return self.store.update(candidate.job_id, lambda r: claim(r, candidate.attempt, self.worker_name))
        except (JobNotFound, JobConflict) as error:  # claimed by another worker, or cancelled, meanwhile
            log.info("job %s: not claimed: %s", candidate.job_id, error)
            return None

    def _run(self, record: JobRecord, stopping: threading.Event) -> JobState | None:
        job_id, attempt = record.job_id, record.attempt
        self.metrics.jobs.labels(state="running").inc()
        log.info("job %s (%s/%s): attempt %d on %s", job_id, record.tenant, record.task_id, attempt, self.worker_name)
        with self.lease(job_id, f"{self.worker_name}/{attempt}"):
            try:
                return TrainingRun(self, record, stopping).run()
            except (JobConflict, JobNotFound) as error:  # cancelled, redelivered elsewhere or quarantined meanwhile
                log.info("job %s: stopped: %s", job_id, error)
                return None
            except TrainingDiverged as error:
                log.warning("job %s: %s", job_id, error)
                return self.fail(record, str(error))
            except Exception as error:
                log.exception("job %s failed", job_id)
                return self.fail(record, f"training failed: {type(error).__name__}: {error}")

    def fail(self, record: JobRecord, message: str) -> JobState | None:
        # An exception's text may quote anything, even a lone surrogate: store it as valid, bounded text.
        error = message[:MAX_ERROR_CHARS].encode("utf-8", "backslashreplace").decode()
        try:
            self.store.update(record.job_id, lambda r: failed(r, record.attempt, error))
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
        self.release_reason: str | None = None
        self.progress = record.progress
        self.trainer: PromptTrainer | EnsembleTrainer | None = None
        self._started = self._polled = self._looked_for_others = time.monotonic()
        self._written = time.perf_counter()
        self._step_started = time.perf_counter()

    def run(self) -> JobState | None:
        dataset = self.store.dataset(self.job_id)
        self.trainer = trainer = trainer_for(
            self.runner.model, dataset.train, dataset.eval, self.record.config, source_prompt=dataset.source_prompt
        )
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
            return self._release(self.release_reason) if self.release_reason else None
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
            self.release_reason = SHUTDOWN
            return True
        now = time.monotonic()
        if now - self._polled < POLL_S:
            return False
        self._polled = now
        record = self.store.get(self.job_id)
        if record.state != JobState.RUNNING or record.attempt != self.attempt:
            return True
        if self._slice_used_up(now):
            self.release_reason = YIELDED
            return True
        return False

    def _slice_used_up(self, now: float) -> bool:
        """Past its time slice with another tenant's job waiting: the job yields its worker (fair share)."""
        slice_s = self.runner.time_slice_s
        if not slice_s or now - self._started < slice_s or now - self._looked_for_others < WAITING_POLL_S:
            return False
        self._looked_for_others = now
        return others_waiting(self.store.active(), self.record.tenant)

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

    def _release(self, reason: str) -> JobState:
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
        log.info("job %s: back in the queue at step %d: %s", self.job_id, checkpoint.step, reason)
        return JobState.QUEUED

    def _finish(self, result: TrainingResult) -> JobState | None:
        self.store.update(self.job_id, lambda r: finishing(r, self.attempt))
        record = self.record
        try:
            version = self._register(result)
        except Exception as error:
            log.exception("job %s: registering the prompt failed", self.job_id)
            return self.runner.fail(record, f"the prompt could not be registered: {type(error).__name__}: {error}")
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

    def _register(self, result: TrainingResult) -> int:
        """Publishes the trained prompt as a new version and returns it. An ensemble's members become versions in
        turn (the first activated if asked, as a one-prompt job's) and then the task's ensemble: the first's version
        is returned."""
        record, runner = self.record, self.runner
        prompts = [m.prompt for m in result.members] if isinstance(result, EnsembleResult) else [result.prompt]
        if len(prompts) > 1 and runner.set_ensemble is None:
            raise RuntimeError("this worker cannot set a task's ensemble")
        versions = []
        for index, prompt in enumerate(prompts):
            activate = record.activate and index == 0
            task = runner.publish(
                record.tenant, record.task_id, prompt, task_metadata(result), activate, runner.model.model_id
            )
            versions.append(task.versions[-1].version)  # the store's record as its own write left it
        if len(versions) > 1 and runner.set_ensemble is not None:
            runner.set_ensemble(record.tenant, record.task_id, versions)
        return versions[0]
