"""`softserve worker`: the worker process's composition root. Loads the model once and runs training jobs from the
Redis queue, one at a time.

Run one per GPU, with the same settings as `softserve serve --store redis` (same Redis, namespace and
data dir): trained prompts go through the `RedisStore` (and its disk mirror), whose change notices make
every API replica serve the new version without a restart.
"""

from __future__ import annotations

import logging
import os
import socket

from prometheus_client import start_http_server
from redis.exceptions import RedisError

from server.backend import NeedsRedis, open_redis_backend
from server.jobs.job_runner import JobRunner
from server.jobs.lease import RedisLease
from server.jobs.reaper import Reaper
from server.jobs.records import JOB_STATES
from server.jobs.rq_queue import TrainingWorker
from server.metrics import TrainingMetrics
from server.serving.model import FrozenT5
from server.settings import Settings

log = logging.getLogger(__name__)


def worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class RedisUnreachable(Exception):
    """The worker's Redis does not answer: it takes nothing, so it does not start."""


def run_worker(settings: Settings) -> None:
    try:
        backend = open_redis_backend(settings)
    except NeedsRedis as error:
        raise SystemExit(str(error)) from None
    try:
        backend.connect().ping()  # before the model loads, and before each component fails on its own
    except RedisError as error:
        raise RedisUnreachable(f"cannot reach Redis ({error}); is it running at --redis-url?") from None
    model = FrozenT5.load(settings.model, settings.device, settings.dtype)
    model.use_cpu_threads(settings.cpu_threads)
    metrics = TrainingMetrics(job_states=JOB_STATES)  # every state's series at 0 from the start
    if settings.worker_metrics_port:
        start_http_server(settings.worker_metrics_port, addr=settings.host, registry=metrics.registry)
    name = worker_name()
    runner = JobRunner(
        model,
        backend.jobs,
        backend.prompts.add_version,
        metrics,
        worker_name=name,
        checkpoint_every=settings.training_checkpoint_every,
        requeue=backend.queue.submit,
        lease=RedisLease(backend.jobs, settings.training_lease_s),
        time_slice_s=settings.training_time_slice_s,
        set_ensemble=backend.prompts.set_ensemble,
    )
    reaper = Reaper(
        backend.jobs,
        backend.queue,
        metrics,
        lease_s=settings.training_lease_s,
        interval_s=settings.training_reaper_interval_s,
        max_attempts=settings.training_max_attempts,
    )
    try:
        reaper.sweep()
    except Exception:
        log.exception("the start-up job reaper pass failed; the periodic passes retry")
    reaper.start()
    queue = backend.queue.queue
    worker = TrainingWorker([queue], connection=backend.connect(), name=name, runner=runner)
    log.info("worker %s: taking training jobs from %s (model %s on %s)", name, queue.name, model.model_id, model.device)
    try:
        worker.work(logging_level="INFO")
    finally:
        reaper.stop()
        backend.close()
