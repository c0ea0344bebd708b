"""`RegistrySync`: keeps one replica's cached prompts in step with the Redis registry all replicas share.

Pub/sub loses every message sent while a connection is down, so notices alone are not enough:
- notices: each write publishes one; the listener refreshes that task here (drop it; reload it if pinned).
- reconciliation, on every (re)connect and every `registry_reconcile_s`: each cached task's `updated_at`
  is compared with Redis in one pipelined round trip; changed or deleted tasks are refreshed.
- health: while the listener cannot reach Redis the replica is degraded (`/ready` says so): requests are
  served from the device cache and the disk mirror, writes answer 503. When Redis answers again, the
  listener rebuilds Redis from the mirror if Redis lost its data, reconciles, and turns healthy: no restart.
"""

from __future__ import annotations

import asyncio
import json
import logging

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from prompt_store import PromptStoreError, RedisStore
from server.metrics import ServerMetrics
from server.registry import PromptRegistry

log = logging.getLogger(__name__)

MAX_RETRY_S = 1.0


class SyncMetrics:
    def __init__(self, metrics: ServerMetrics) -> None:
        r = metrics.registry
        self.store_up = Gauge(
            "softserve_registry_store_up", "1 while this replica reaches the Redis registry", registry=r
        )
        self.reconciles = Counter(
            "softserve_registry_reconciles_total", "Cache checks against Redis, by trigger", ["trigger"], registry=r
        )
        self.refreshes = Counter(
            "softserve_registry_refreshes_total",
            "Cached tasks dropped because they changed elsewhere, by how it was learnt",
            ["cause"],
            registry=r,
        )


class RegistrySync:
    def __init__(
        self,
        store: RedisStore,
        registry: PromptRegistry,
        metrics: ServerMetrics,
        reconcile_interval_s: float,
    ) -> None:
        self._store = store
        self._registry = registry
        self._interval = reconcile_interval_s
        # No retries inside redis-py: a lost connection must surface here, to reconcile after it.
        self._client = aioredis.Redis.from_url(
            store.url,
            socket_connect_timeout=store.timeout_s,
            socket_timeout=store.timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._metrics = SyncMetrics(metrics)
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.problem = "not connected to Redis yet"

    @property
    def healthy(self) -> bool:
        return self._connected.is_set()

    async def start(self, wait_s: float) -> None:
        """Starts listening; waits up to `wait_s` for the first connection (start-up does not need it)."""
        self._task = asyncio.create_task(self._run(), name="registry-sync")
        try:
            await asyncio.wait_for(self._connected.wait(), wait_s)
        except asyncio.TimeoutError:
            log.warning("Redis registry not reachable at start-up; serving from the disk mirror (degraded)")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._client.aclose()

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except (RedisError, PromptStoreError, OSError) as error:
                self._set_down(f"{type(error).__name__}: {error}")
            except Exception as error:  # a bug here must not end the sync for good
                log.exception("registry sync failed")
                self._set_down(f"{type(error).__name__}: {error}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_S) if not self.healthy else 0.1

    async def _session(self) -> None:
        loop = asyncio.get_running_loop()
        async with self._client.pubsub() as pubsub:
            await self._subscribe(pubsub)
            self._store.mark_available()
            await asyncio.to_thread(self._store.ensure_populated)
            await self.reconcile("connect")  # after subscribing: no change falls between the two
            self._set_up()
            next_check = loop.time() + self._interval
            while True:
                wait = min(max(next_check - loop.time(), 0.0), 1.0)
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
                if message is not None and message["type"] == "message":
                    self._on_notice(message["data"])
                if loop.time() >= next_check:
                    await self.reconcile("periodic")
                    next_check = loop.time() + self._interval

    async def _subscribe(self, pubsub: aioredis.client.PubSub) -> None:
        await pubsub.subscribe(self._store.channel)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5 * self._store.timeout_s
        while loop.time() < deadline:
            message = await pubsub.get_message(timeout=self._store.timeout_s)
            if message is not None and message["type"] == "subscribe":
                return
        raise ConnectionError("Redis did not confirm the subscription")

    def _on_notice(self, data: bytes) -> None:
        try:
            notice = json.loads(data)
            tenant, task_id, updated_at = notice["tenant"], notice["task_id"], float(notice["updated_at"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed registry notice: %r", data[:200])
            return
        if self._registry.refresh(tenant, task_id, updated_at):
            self._metrics.refreshes.labels(cause="notice").inc()

    async def reconcile(self, trigger: str) -> int:
        """Refreshes every cached task whose Redis state differs from the cached one; returns how many."""
        cached = self._registry.cached_records()
        keys = list(cached)
        stamps = await asyncio.to_thread(self._store.task_stamps, keys) if keys else []
        stale = [key for key, stamp in zip(keys, stamps, strict=True) if stamp != cached[key].updated_at]
        for tenant, task_id in stale:
            if self._registry.refresh(tenant, task_id):
                self._metrics.refreshes.labels(cause="reconcile").inc()
        await self._registry.preload(only_missing=True)
        self._metrics.reconciles.labels(trigger=trigger).inc()
        if stale:
            log.info("reconciliation (%s) refreshed %d task(s)", trigger, len(stale))
        return len(stale)

    def _set_up(self) -> None:
        if not self.healthy:
            log.info("Redis registry reachable: change notices on %s", self._store.channel)
        self.problem = ""
        self._connected.set()
        self._metrics.store_up.set(1)

    def _set_down(self, problem: str) -> None:
        if self.healthy:
            log.warning("lost the Redis registry (%s): degraded until it is back", problem)
        self.problem = problem
        self._connected.clear()
        self._metrics.store_up.set(0)
