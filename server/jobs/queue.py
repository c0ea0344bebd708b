"""The job queue interface and its embedded implementation: one worker thread in the server process."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Protocol

from server.jobs.job_runner import JobRunner, Requeue
from server.jobs.records import JobState
from server.jobs.recovery import requeue_abandoned

log = logging.getLogger(__name__)

RESTART_REASON = "the server stopped while the job was running"
STOP_WAIT_S = 60.0


class JobQueue(Protocol):
    def submit(self, job_id: str, attempt: int) -> None:
        """Queues a delivery for queued job `job_id` (attempt `attempt`): a worker that takes it runs the next
        job in the fair order (`server.jobs.fairness`), which need not be this one."""

    def start(self) -> None: ...

    def stop(self) -> None:
        """Stops taking jobs; a running one is checkpointed and left queued for the next start."""


class ThreadQueue:
    """Runs jobs one at a time on a thread of the server process (no Redis), in the fair order.

    Each delivery wakes the thread for one job. On start it takes back what the previous process left:
    queued jobs are queued again, running ones (the process died under them) resume from their checkpoint,
    or fail after `max_attempts` losses.
    """

    def __init__(self, make_runner: Callable[[Requeue], JobRunner], max_attempts: int) -> None:
        """`make_runner` builds the runner given how to queue a job again: through this queue."""
        self.max_attempts = max_attempts
        self._pending: queue.Queue[tuple[str, int] | None] = queue.Queue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._work, name="training-worker", daemon=True)
        self.runner = make_runner(self.submit)

    def submit(self, job_id: str, attempt: int) -> None:
        if not self._stopping.is_set():
            self._pending.put((job_id, attempt))

    def start(self) -> None:
        store, metrics = self.runner.store, self.runner.metrics
        for record in store.active():
            if record.state == JobState.RUNNING:
                requeue_abandoned(store, record, self.max_attempts, RESTART_REASON, self.submit, metrics)
            else:
                self.submit(record.job_id, record.attempt)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._pending.put(None)
        if self._thread.is_alive():
            self._thread.join(STOP_WAIT_S)

    def _work(self) -> None:
        while not self._stopping.is_set():
            item = self._pending.get()
            if item is None:
                break
            try:
                self.runner.run_next(stopping=self._stopping)
            except Exception:  # the store failed under the runner; the thread must keep serving jobs
                log.exception("training delivery for job %s (attempt %d) failed", *item)
