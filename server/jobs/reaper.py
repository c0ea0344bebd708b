"""How RQ 3 treats a worker that dies mid-job, and why that is not enough here: a job being run sits in the
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
"""

from __future__ import annotations

import logging
import threading
import time

from server.jobs.records import JobRecord, JobState
from server.jobs.recovery import requeue_abandoned
from server.jobs.redis_store import RedisJobStore
from server.jobs.rq_queue import RQJobQueue, delivery_id
from server.metrics import TrainingMetrics

log = logging.getLogger(__name__)

LOST_WORKER = "the worker running the job stopped renewing its lease"
LOST_DELIVERY = "the job's queue entry was lost"


class Reaper:
    """Requeues (or fails) jobs whose worker died; see the module docstring for the rule and the bound."""

    def __init__(
        self,
        store: RedisJobStore,
        queue: RQJobQueue,
        metrics: TrainingMetrics,
        *,
        lease_s: float,
        interval_s: float,
        max_attempts: int,
    ) -> None:
        self.store = store
        self.queue = queue
        self.lease_s = lease_s
        self.interval_s = interval_s
        self.max_attempts = max_attempts
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
