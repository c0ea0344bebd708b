"""`softserve worker`: loads the model once and runs training jobs from the Redis queue, one at a time.

Run one per GPU, with the same settings as `softserve serve --store redis` (same Redis, namespace and
data dir): trained prompts go through the `RedisStore` (and its disk mirror), whose change notices make
every API replica serve the new version without a restart.
"""

from __future__ import annotations

import logging
import os
import socket

import redis
from prometheus_client import start_http_server

from server.jobs.redis_store import RedisJobStore
from server.jobs.rq_queue import Reaper, RedisLease, RQJobQueue, TrainingWorker
from server.jobs.runner import JobRunner
from server.metrics import TrainingMetrics
from server.model import FrozenT5
from server.runtime import open_store
from server.settings import Settings

log = logging.getLogger(__name__)

NEEDS_REDIS = (
    "`softserve worker` takes jobs from Redis: run it with --store redis (and the API replicas too). "
    "Without Redis, `softserve serve` trains in its own process."
)


def worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def run_worker(settings: Settings) -> None:
    if settings.store != "redis":
        raise SystemExit(NEEDS_REDIS)
    model = FrozenT5.load(settings.model, settings.device, settings.dtype)
    model.use_cpu_threads(settings.cpu_threads)
    prompts = open_store(settings)
    jobs = RedisJobStore.from_url(settings.redis_url, settings.redis_namespace, settings.redis_timeout_s)
    metrics = TrainingMetrics()
    if settings.worker_metrics_port:
        start_http_server(settings.worker_metrics_port, addr=settings.host, registry=metrics.registry)
    connection = redis.Redis.from_url(settings.redis_url)
    queue = RQJobQueue(connection, settings)
    name = worker_name()
    runner = JobRunner(
        model,
        jobs,
        prompts.add_version,
        metrics,
        worker_name=name,
        checkpoint_every=settings.training_checkpoint_every,
        requeue=queue.submit,
        lease=RedisLease(jobs, settings.training_lease_s),
        time_slice_s=settings.training_time_slice_s,
    )
    reaper = Reaper(jobs, queue, settings, metrics)
    try:
        reaper.sweep()
    except Exception:
        log.exception("the start-up job reaper pass failed; the periodic passes retry")
    reaper.start()
    worker = TrainingWorker([queue.queue], connection=connection, name=name, runner=runner)
    log.info(
        "worker %s: taking training jobs from %s (model %s on %s)", name, queue.queue.name, model.model_id, model.device
    )
    try:
        worker.work(logging_level="INFO")
    finally:
        reaper.stop()
        jobs.close()
