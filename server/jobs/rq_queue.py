"""Training jobs over Redis with RQ: the queue API replicas enqueue to, and what `softserve worker` runs.

Why RQ: training jobs are few and long (minutes to hours), one at a time per GPU, Python only, and Redis
is already there (the prompt registry). RQ is the small, well-kept job library on Redis alone: no other
broker (unlike Celery), plain functions as jobs, worker registration and a CLI to inspect queues. It
carries the deliveries; the job's state of record (progress, checkpoint, result) stays in our
`RedisJobStore`, because RQ's job hash has no progress and expires after its result TTL.

How RQ 3 treats a worker that dies mid-job, and why that is not enough here: a job being run sits in the
queue's `StartedJobRegistry` until its heartbeat TTL runs out. The forking `Worker` renews it every
`job_monitoring_interval` (+60 s); `SimpleWorker`, which we use (the model is loaded once in the worker
process and jobs run in it; forking a process that holds CUDA state is unsafe), sets it once to
`job_timeout + 60 s` and never renews it. When it has run out, `StartedJobRegistry.cleanup`, run by any
worker's maintenance every `maintenance_interval` (600 s by default), fails the job with
`AbandonedJobError` or, if the job was enqueued with a `Retry`, enqueues it again. So RQ alone would take
a whole job timeout (a day) to notice a dead trainer, and would wrongly abandon a live one that runs
past its TTL. Hence:
- deliveries are enqueued without `Retry` and with `job_timeout = training_job_timeout_s`: RQ never
  redelivers on its own, and one delivery cannot run forever (a timeout fails the job with the reason);
- a running job holds a lease key (TTL `training_lease_s`) that a thread of its worker renews every third
  of it, independent of training steps;
- every worker runs a reaper at start and every `training_reaper_interval_s`: a running job with no
  lease whose record has not changed for `training_lease_s` is requeued under a new delivery token from
  its last checkpoint, or failed with the reason after `training_max_attempts` losses
  (`server.jobs.recovery`); queued jobs are requeued only when fewer deliveries wait than jobs are queued.
The bound: a SIGKILLed worker's job is back in the queue within `training_lease_s +
training_reaper_interval_s` while another worker lives, or as soon as one starts.

Fairness across tenants: one RQ queue carries the deliveries, but a delivery only wakes a worker, which
then takes the next queued job in the fair order (`server.jobs.fairness`, turns shared in Redis): the
fair order is enforced when a worker picks, not by the order of the RQ queue. Every change that queues a
job (submit, release, reaper) enqueues one delivery, and a worker claims at most one job per delivery,
so there are always at least as many deliveries waiting as jobs queued (the reaper tops them up if an
enqueue was lost); a delivery that finds nothing to claim is a no-op.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis
from rq import Queue, SimpleWorker

from server.jobs.errors import JobStoreUnavailable
from server.jobs.records import JobRecord, JobState
from server.jobs.recovery import requeue_abandoned
from server.jobs.redis_store import RedisJobStore
from server.jobs.runner import JobRunner
from server.metrics import TrainingMetrics
from server.settings import Settings

log = logging.getLogger(__name__)

RESULT_TTL_S = 3600
FAILURE_TTL_S = 7 * 24 * 3600
LOST_WORKER = "the worker running the job stopped renewing its lease"
LOST_DELIVERY = "the job's queue entry was lost"


def queue_name(settings: Settings) -> str:
    return f"{settings.redis_namespace}-training"


def delivery_id(job_id: str, attempt: int) -> str:
    return f"{job_id}-{attempt}"


class RQJobQueue:
    """Enqueues deliveries (`run_training_job(job_id, attempt)`) on the RQ queue the workers listen to."""

    def __init__(self, connection: redis.Redis, settings: Settings) -> None:
        self.queue = Queue(queue_name(settings), connection=connection)
        self.job_timeout_s = int(settings.training_job_timeout_s)

    def submit(self, job_id: str, attempt: int) -> None:
        try:
            self.queue.enqueue(
                run_training_job,
                job_id,
                attempt,
                job_id=delivery_id(job_id, attempt),
                job_timeout=self.job_timeout_s,
                result_ttl=RESULT_TTL_S,
                failure_ttl=FAILURE_TTL_S,
                description=f"training job {job_id}, attempt {attempt}",
            )
        except (redis.ConnectionError, redis.TimeoutError) as error:
            raise JobStoreUnavailable(f"the training queue (Redis) is unavailable: {error}") from error

    def waiting(self) -> set[str]:
        """Delivery ids waiting in the queue now."""
        return set(self.queue.get_job_ids())

    def start(self) -> None:
        """Nothing to start on the API side: `softserve worker` processes take the deliveries."""

    def stop(self) -> None:
        self.queue.connection.close()


# Leases


class RedisLease:
    """`JobRunner`'s lease: held while a delivery runs, renewed by a thread every third of its TTL."""

    def __init__(self, store: RedisJobStore, ttl_s: float) -> None:
        self.store = store
        self.ttl_s = ttl_s

    @contextmanager
    def __call__(self, job_id: str, holder: str) -> Iterator[None]:
        self.store.hold_lease(job_id, holder, self.ttl_s)
        done = threading.Event()
        thread = threading.Thread(target=self._renew, args=(job_id, holder, done), name=f"lease-{job_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            try:
                self.store.drop_lease(job_id, holder)
            except JobStoreUnavailable:
                log.warning("job %s: could not drop the lease (it expires by itself)", job_id)

    def _renew(self, job_id: str, holder: str, done: threading.Event) -> None:
        while not done.wait(self.ttl_s / 3):
            try:
                self.store.hold_lease(job_id, holder, self.ttl_s)
            except JobStoreUnavailable as error:
                log.warning("job %s: lease renewal failed: %s", job_id, error)


# The reaper


class Reaper:
    """Requeues (or fails) jobs whose worker died; see the module docstring for the rule and the bound."""

    def __init__(self, store: RedisJobStore, queue: RQJobQueue, settings: Settings, metrics: TrainingMetrics) -> None:
        self.store = store
        self.queue = queue
        self.lease_s = settings.training_lease_s
        self.interval_s = settings.training_reaper_interval_s
        self.max_attempts = settings.training_max_attempts
        self.metrics = metrics
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="job-reaper", daemon=True)

    def sweep(self) -> list[JobRecord]:
        """One pass; returns the jobs it requeued or failed."""
        waiting = self.queue.waiting()
        active = self.store.active()
        # Any waiting delivery runs the next queued job, so queued jobs lack deliveries only in number.
        missing = sum(record.state == JobState.QUEUED for record in active) - len(waiting)
        taken = []
        for record in active:
            if time.time() - record.updated_at < self.lease_s:
                continue
            if self.store.lease_holder(record.job_id) is not None:
                continue
            if record.state == JobState.QUEUED:
                if missing <= 0 or delivery_id(record.job_id, record.attempt) in waiting:
                    continue
                missing -= 1
            reason = LOST_WORKER if record.state == JobState.RUNNING else LOST_DELIVERY
            updated = requeue_abandoned(self.store, record, self.max_attempts, reason, self.queue.submit, self.metrics)
            if updated is not None:
                taken.append(updated)
        return taken

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._done.wait(self.interval_s):
            try:
                self.sweep()
            except Exception:  # Redis down, or a bug: the next pass tries again
                log.exception("job reaper pass failed")


# The worker


@dataclass
class _Active:
    runner: JobRunner | None = None
    stopping: threading.Event | None = None


_active = _Active()


class TrainingWorker(SimpleWorker):
    """RQ's in-process worker holding a `JobRunner` (one loaded model for every job it runs).

    A warm shutdown (SIGTERM) also stops the running job at its next step; the job is checkpointed there
    and put back in the queue for another worker (or this one, restarted).
    """

    def __init__(self, *args: object, runner: JobRunner, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        _active.runner, _active.stopping = runner, threading.Event()

    def handle_warm_shutdown_request(self) -> None:
        if _active.stopping is not None:
            _active.stopping.set()


def run_training_job(job_id: str, attempt: int) -> str | None:
    """The RQ job function: a delivery queued for `job_id`; the `TrainingWorker` that dequeued it runs the
    next job in the fair order (often this one; see the module docstring)."""
    if _active.runner is None or _active.stopping is None:
        raise RuntimeError("training jobs run in `softserve worker` processes")
    state = _active.runner.run_next(_active.stopping)
    return state.value if state is not None else None
