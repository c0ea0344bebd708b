"""Training jobs over Redis with RQ: the queue API replicas enqueue to, and what `softserve worker` runs.

Why RQ: training jobs are few and long (minutes to hours), one at a time per GPU, Python only, and Redis
is already there (the prompt registry). RQ is the small, well-kept job library on Redis alone: no other
broker (unlike Celery), plain functions as jobs, worker registration and a CLI to inspect queues. It
carries the deliveries; the job's state of record (progress, checkpoint, result) stays in our
`RedisJobStore`, because RQ's job hash has no progress and expires after its result TTL.

A worker that dies mid-job is noticed by the lease (`server.jobs.lease`) and the reaper
(`server.jobs.reaper`), not by RQ: see the reaper for why and for the bound.

Fairness across tenants: one RQ queue carries the deliveries, but a delivery only wakes a worker, which
then takes the next queued job in the fair order (`server.jobs.fairness`, turns shared in Redis): the
fair order is enforced when a worker picks, not by the order of the RQ queue. Every change that queues a
job (submit, release, reaper) enqueues one delivery, and a worker claims at most one job per delivery,
so there are always at least as many deliveries waiting as jobs queued (the reaper tops them up if an
enqueue was lost); a delivery that finds nothing to claim is a no-op.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import redis
from rq import Queue, SimpleWorker

from server.jobs.errors import JobStoreUnavailable
from server.jobs.job_runner import JobRunner

RESULT_TTL_S = 3600
FAILURE_TTL_S = 7 * 24 * 3600


def queue_name(namespace: str) -> str:
    return f"{namespace}-training"


def delivery_id(job_id: str, attempt: int) -> str:
    return f"{job_id}-{attempt}"


class RQJobQueue:
    """Enqueues deliveries (`run_training_job(job_id, attempt)`) on the RQ queue the workers listen to."""

    def __init__(self, connection: redis.Redis, namespace: str, job_timeout_s: float) -> None:
        self.queue = Queue(queue_name(namespace), connection=connection)
        self.job_timeout_s = int(job_timeout_s)

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
        """Nothing to start or stop on the API side: `softserve worker` processes take the deliveries (the
        backend closes the connection)."""

    def stop(self) -> None:
        """See `start`."""


LISTENER_POLL_S = 1.0
"""How long the worker's RQ command listener waits for a message (or a subscription) before it looks whether
it was stopped (`TrainingWorker.subscribe`)."""


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

    def __init__(self, *args: Any, runner: JobRunner, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _active.runner, _active.stopping = runner, threading.Event()

    def handle_warm_shutdown_request(self) -> None:
        if _active.stopping is not None:
            _active.stopping.set()

    def subscribe(self) -> None:
        """RQ's own, with its command listener polling every `LISTENER_POLL_S` instead of 60 s.

        At exit RQ unsubscribes, then waits for the listener thread (redis-py's `stop()` joins it). When the
        listener reads the unsubscribe reply before it sees the stop, it waits for a new subscription for the
        rest of its poll: a SIGTERMed worker that had checkpointed its job at once still took up to a minute
        to exit. With a short poll, that wait is at most `LISTENER_POLL_S`.
        """
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(
            sleep_time=LISTENER_POLL_S, daemon=True, exception_handler=self._pubsub_exception_handler
        )


def run_training_job(job_id: str, attempt: int) -> str | None:
    """The RQ job function: a delivery queued for `job_id`; the `TrainingWorker` that dequeued it runs the
    next job in the fair order (often this one; see the module docstring)."""
    if _active.runner is None or _active.stopping is None:
        raise RuntimeError("training jobs run in `softserve worker` processes")
    state = _active.runner.run_next(_active.stopping)
    return state.value if state is not None else None
