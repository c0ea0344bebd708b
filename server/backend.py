"""Where state lives, decided once: the disk of one process, or Redis shared by API replicas and workers.

`open_backend(settings)` is the only place that reads `store`. The `Backend` it returns provides what
differs between the two: the prompt store, the job store, the training queue, the rate limiter's storage and
(Redis only) the registry's sync; `close()` closes what it opened. Every Redis client comes from
`prompt_store.redis_clients`, with the same timeouts and the namespace of the settings.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import redis
from limits.aio.storage import MemoryStorage, RedisStorage, Storage

from prompt_store import DiskStore, PromptStore, RedisStore
from prompt_store.redis_clients import connect, connect_async
from prompt_store.residency import DiskResidency, RedisResidency, ResidencyStore
from server.jobs.job_runner import JobRunner, Requeue
from server.jobs.queue import JobQueue, ThreadQueue
from server.jobs.redis_store import RedisJobStore
from server.jobs.rq_queue import RQJobQueue
from server.jobs.store import DiskJobStore, JobStore
from server.metrics import ServerMetrics
from server.registry.registry import PromptRegistry
from server.registry.sync import RegistrySync
from server.settings import Settings

MakeRunner = Callable[[Requeue], JobRunner]

NEEDS_REDIS = (
    "`softserve worker` takes jobs from Redis: run it with --store redis (and the API replicas too). "
    "Without Redis, `softserve serve` trains in its own process."
)


class Backend(Protocol):
    prompts: PromptStore
    jobs: JobStore
    residency: ResidencyStore  # pins and use counts: shared by the replicas that share the prompts

    def training_queue(self, in_process_runner: MakeRunner) -> JobQueue:
        """Where submitted jobs go. `in_process_runner` builds the runner of a worker thread in this process,
        for a backend whose jobs are trained here."""
        ...

    def rate_limit_storage(self) -> Storage:
        """The rate limiter's counters: shared by every replica that shares this backend."""
        ...

    def registry_sync(
        self, registry: PromptRegistry, metrics: ServerMetrics, reconcile_interval_s: float
    ) -> RegistrySync | None:
        """What keeps `registry` in step with other replicas' changes; None when no other replica can change it."""
        ...

    def close(self) -> None: ...


class DiskBackend:
    """One process: prompts and job records under the data directory, jobs trained on a thread of the server."""

    def __init__(self, data_dir: Path, max_attempts: int) -> None:
        self.prompts = DiskStore(data_dir / "prompts")
        self.jobs = DiskJobStore(data_dir / "jobs")
        self.residency = DiskResidency(data_dir / "residency")
        self.max_attempts = max_attempts

    def training_queue(self, in_process_runner: MakeRunner) -> JobQueue:
        return ThreadQueue(in_process_runner, self.max_attempts)

    def rate_limit_storage(self) -> Storage:
        return MemoryStorage()

    def registry_sync(
        self, registry: PromptRegistry, metrics: ServerMetrics, reconcile_interval_s: float
    ) -> RegistrySync | None:
        return None

    def close(self) -> None:
        """Nothing to close: every file is written whole when it is written."""


class RedisBackend:
    """Replicas and workers sharing one Redis: prompts in Redis written through to the disk mirror in the data
    directory, job records and the training queue (RQ) in Redis, rate limits counted in Redis."""

    def __init__(self, url: str, namespace: str, timeout_s: float, data_dir: Path, job_timeout_s: float) -> None:
        self.url, self.namespace, self.timeout_s = url, namespace, timeout_s
        self.prompts = RedisStore(url, DiskStore(data_dir / "prompts"), namespace, timeout_s)
        self.residency = RedisResidency(self.prompts.client, namespace)
        self.jobs = RedisJobStore(self.connect(), namespace)
        self.queue = RQJobQueue(self.connect(), namespace, job_timeout_s)

    def connect(self) -> redis.Redis:
        """A new client of this backend's Redis (an RQ worker adjusts its own connection's timeout)."""
        return connect(self.url, self.timeout_s)

    def training_queue(self, in_process_runner: MakeRunner) -> JobQueue:
        return self.queue  # `softserve worker` processes train; this process only queues

    def rate_limit_storage(self) -> Storage:
        pool = connect_async(self.url, self.timeout_s).connection_pool
        return RedisStorage(
            self.url, implementation="redispy", key_prefix=f"{self.namespace}:limits", connection_pool=pool
        )

    def registry_sync(
        self, registry: PromptRegistry, metrics: ServerMetrics, reconcile_interval_s: float
    ) -> RegistrySync | None:
        client = connect_async(self.url, self.timeout_s)
        return RegistrySync(self.prompts, registry, metrics, reconcile_interval_s, client)

    def close(self) -> None:
        self.prompts.close()
        self.jobs.close()
        self.queue.queue.connection.close()


def open_backend(settings: Settings) -> Backend:
    if settings.store == "redis":
        return open_redis_backend(settings)
    return DiskBackend(settings.data_dir, settings.training_max_attempts)


def open_redis_backend(settings: Settings) -> RedisBackend:
    """The Redis backend, for what only works with Redis (`softserve worker`); `NeedsRedis` otherwise."""
    if settings.store != "redis":
        raise NeedsRedis(NEEDS_REDIS)
    return RedisBackend(
        settings.redis_url,
        settings.redis_namespace,
        settings.redis_timeout_s,
        settings.data_dir,
        settings.training_job_timeout_s,
    )


class NeedsRedis(Exception):
    """A process that only works with Redis was started with another store."""
