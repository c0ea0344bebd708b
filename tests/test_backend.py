"""The backend: disk or Redis decided once, every Redis client with the same timeouts, one namespace for all keys."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from limits.aio.storage import MemoryStorage

from prompt_store import DiskStore, RedisStore, TaskRecord
from server.backend import DiskBackend, MakeRunner, NeedsRedis, RedisBackend, open_backend, open_redis_backend
from server.jobs.job_runner import JobRunner, Requeue
from server.jobs.queue import ThreadQueue
from server.jobs.redis_store import RedisJobStore
from server.jobs.rq_queue import RQJobQueue
from server.jobs.store import DiskJobStore
from server.metrics import ServerMetrics, TrainingMetrics
from server.registry.registry import PromptRegistry
from server.serving.model import FrozenT5
from server.settings import Settings
from server.tenancy.rate_limits import TenantRateLimits
from tests.redis_server import RedisServer

TIMEOUT_S = 0.25


def redis_settings(redis_server: RedisServer, tmp_path: Path, namespace: str = "softserve") -> Settings:
    return Settings(
        store="redis",
        redis_url=redis_server.url,
        redis_namespace=namespace,
        redis_timeout_s=TIMEOUT_S,
        data_dir=tmp_path,
    )


def in_process_runner(model: FrozenT5, backend: DiskBackend) -> MakeRunner:
    def unused_publisher(*args: object) -> TaskRecord:
        raise AssertionError("no job runs in this test")

    def make(requeue: Requeue) -> JobRunner:
        return JobRunner(
            model,
            backend.jobs,
            unused_publisher,
            TrainingMetrics(),
            worker_name="t",
            checkpoint_every=1,
            requeue=requeue,
        )

    return make


def test_the_disk_backend_keeps_everything_in_the_data_dir_and_this_process(tmp_path: Path, tiny: FrozenT5) -> None:
    backend = open_backend(Settings(data_dir=tmp_path))
    assert isinstance(backend, DiskBackend)
    assert isinstance(backend.prompts, DiskStore) and backend.prompts.root == tmp_path / "prompts"
    assert isinstance(backend.jobs, DiskJobStore) and backend.jobs.root == tmp_path / "jobs"
    assert isinstance(backend.rate_limit_storage(), MemoryStorage)
    registry = PromptRegistry(backend.prompts, tiny.prompt_on_device, 2**20)
    assert backend.registry_sync(registry, ServerMetrics(), 1.0) is None
    queue = backend.training_queue(in_process_runner(tiny, backend))
    assert isinstance(queue, ThreadQueue)
    assert queue.runner.requeue == queue.submit  # a job that yields its turn goes back through this queue
    backend.close()


def test_the_redis_backend_shares_everything_through_redis(redis_server: RedisServer, tmp_path: Path) -> None:
    backend = open_backend(redis_settings(redis_server, tmp_path, namespace="acme"))
    try:
        assert isinstance(backend, RedisBackend)
        assert isinstance(backend.prompts, RedisStore) and backend.prompts.namespace == "acme"
        assert backend.prompts.mirror is not None and backend.prompts.mirror.root == tmp_path / "prompts"
        assert isinstance(backend.jobs, RedisJobStore) and backend.jobs.ns == "acme"
        queue = backend.training_queue(lambda requeue: pytest.fail("a Redis backend trains in `softserve worker`"))
        assert isinstance(queue, RQJobQueue) and queue.queue.name == "acme-training"
    finally:
        backend.close()


def test_every_redis_client_gives_up_on_a_stalled_redis(redis_server: RedisServer, tmp_path: Path) -> None:
    """A stalled Redis (accepting, never answering) makes every client fail after its timeout; none hangs (the
    worker's client once had no timeout at all)."""
    backend = open_redis_backend(redis_settings(redis_server, tmp_path))
    clients = {
        "prompt store": backend.prompts.client,
        "job store": backend.jobs.client,
        "training queue": backend.queue.queue.connection,
        "worker": backend.connect(),
    }
    for client in clients.values():
        assert client.ping()  # connected before the stall: the stall hits a live connection
    redis_server.pause()
    try:
        for name, client in clients.items():
            assert client.connection_pool.connection_kwargs["socket_timeout"] == TIMEOUT_S, name
            with pytest.raises(redis.TimeoutError):
                client.ping()
        limiter = TenantRateLimits(5, 0, backend.rate_limit_storage())
        asyncio.run(asyncio.wait_for(limiter.admit("acme", 1), 60))  # storage times out: the limiter lets it through
    finally:
        redis_server.resume()
        backend.close()


def test_rate_limits_are_shared_within_a_namespace_and_apart_across_namespaces(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    def limiter(namespace: str) -> TenantRateLimits:
        backend = open_redis_backend(redis_settings(redis_server, tmp_path / namespace, namespace))
        return TenantRateLimits(1, 0, backend.rate_limit_storage())

    async def admitted(limits: TenantRateLimits) -> bool:
        try:
            await limits.admit("acme", 1)
        except Exception:
            return False
        return True

    async def scenario() -> list[bool]:
        first, same, other = limiter("one"), limiter("one"), limiter("two")
        return [await admitted(first), await admitted(same), await admitted(other)]

    assert asyncio.run(scenario()) == [True, False, True]
    with redis_server.client() as client:
        keys = [key.decode() for key in client.keys("*limits*")]
    assert keys and all(key.startswith(("one:limits", "two:limits")) for key in keys), keys


def test_the_worker_refuses_to_start_without_redis(tmp_path: Path) -> None:
    with pytest.raises(NeedsRedis):
        open_redis_backend(Settings(data_dir=tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "worker", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "takes jobs from Redis" in result.stderr
    assert "Traceback" not in result.stderr
