"""`RegistrySync`: keeps one replica's cached prompts in step with the Redis registry all replicas share.

Pub/sub loses every message sent while a connection is down, so notices alone are not enough:
- notices: each write publishes one; the listener refreshes that task here (drop it; reload it if pinned).
- reconciliation, on every (re)connect and every `registry_reconcile_s`: each cached task's `updated_at`
  is compared with Redis in one pipelined round trip; changed or deleted tasks are refreshed. The disk
  mirror is synced with Redis too (what write-throughs missed), so it can serve the next outage.
- health: the listener pings Redis several times per `redis_timeout_s`; a Redis that does not answer for
  that long (down, or stalled: a subscription alone would wait forever) makes the replica degraded
  (`/ready` says so): requests are served from the device cache and the disk mirror without trying Redis,
  writes answer 503 without being sent. When Redis answers again, the listener rebuilds Redis from the
  mirror if Redis lost its data, reconciles, and turns healthy: no restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Literal, get_args

import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge
from redis.exceptions import RedisError

from prompt_store import PromptStoreError, RedisStore
from server.metrics import ServerMetrics, zero_series
from server.registry.registry import PromptRegistry
from server.stopping import cancel_and_wait

log = logging.getLogger(__name__)

MAX_RETRY_S = 1.0
PINGS_PER_TIMEOUT = 4
# The label values of the sync's counters (their series exist at 0 from the start).
ReconcileTrigger = Literal["connect", "periodic"]
RefreshCause = Literal["notice", "reconcile"]


class SyncMetrics:
    def __init__(self, metrics: ServerMetrics) -> None:
        r = metrics.registry
        self.store_up = Gauge(
            "softserve_registry_store_up", "1 while this replica reaches the Redis registry", registry=r
        )
        self.reconciles = zero_series(
            Counter(
                "softserve_registry_reconciles_total", "Cache checks against Redis, by trigger", ["trigger"], registry=r
            ),
            get_args(ReconcileTrigger),
        )
        self.refreshes = zero_series(
            Counter(
                "softserve_registry_refreshes_total",
                "Cached tasks dropped because they changed elsewhere, by how it was learnt",
                ["cause"],
                registry=r,
            ),
            get_args(RefreshCause),
        )
        self.mirror_repairs = Counter(
            "softserve_registry_mirror_repairs_total",
            "Tasks the disk mirror lacked or held stale, copied from Redis by reconciliation",
            registry=r,
        )


class RegistrySync:
    def __init__(
        self,
        store: RedisStore,
        registry: PromptRegistry,
        metrics: ServerMetrics,
        reconcile_interval_s: float,
        client: aioredis.Redis,
    ) -> None:
        """`client`: the listener's own connection to the store's Redis, with no retries inside redis-py (a lost
        connection must surface here, to reconcile after it); closed by `stop`."""
        self._store = store
        self._registry = registry
        self._interval = reconcile_interval_s
        self._client = client
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
        await cancel_and_wait(self._task)  # a cancel can land as a Redis read times out: see `server.stopping`
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
        async with self._client.pubsub() as pubsub:
            await self._subscribe(pubsub)
            self._store.mark_available()
            await asyncio.to_thread(self._store.ensure_populated)
            await self.reconcile("connect")  # after subscribing: no change falls between the two
            self._set_up()
            await self._listen(pubsub)

    async def _listen(self, pubsub: aioredis.client.PubSub) -> None:
        """Handles notices, reconciles every `registry_reconcile_s`, and pings Redis several times per timeout:
        raises `TimeoutError` when Redis has not answered for `timeout_s` (a stall sends no error at all)."""
        loop = asyncio.get_running_loop()
        timeout, ping_every = self._store.timeout_s, self._store.timeout_s / PINGS_PER_TIMEOUT
        heard = next_ping = loop.time()
        next_check = heard + self._interval
        while True:
            wait = max(min(next_ping, next_check) - loop.time(), 0.0)
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
            now = loop.time()
            if message is not None:
                heard = now
                if message["type"] == "message":
                    self._on_notice(message["data"])
            elif now - heard > timeout:  # only once nothing is left to read: a busy loop is not a stalled Redis
                raise TimeoutError(f"Redis did not answer a ping within {timeout:g} s (stalled?)")
            if now >= next_ping:
                await pubsub.ping()
                next_ping = now + ping_every
            if now >= next_check:
                await self.reconcile("periodic")
                heard = loop.time()  # it talked to Redis meanwhile; the pongs it left unread are read next
                next_check = heard + self._interval

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

    async def reconcile(self, trigger: ReconcileTrigger) -> int:
        """Refreshes every cached task whose Redis state differs from the cached one; returns how many."""
        cached = self._registry.cached_records()
        keys = list(cached)
        stamps = await asyncio.to_thread(self._store.task_stamps, keys) if keys else []
        stale = [key for key, stamp in zip(keys, stamps, strict=True) if stamp != cached[key].updated_at]
        for tenant, task_id in stale:
            if self._registry.refresh(tenant, task_id):
                self._metrics.refreshes.labels(cause="reconcile").inc()
        await self._registry.preload(only_missing=True)
        await self._sync_mirror()
        self._metrics.reconciles.labels(trigger=trigger).inc()
        if stale:
            log.info("reconciliation (%s) refreshed %d task(s)", trigger, len(stale))
        return len(stale)

    async def _sync_mirror(self) -> None:
        """Repairs the disk mirror from Redis. A disk that cannot be written is logged and retried next time:
        it does not make Redis unreachable, so it must not make the replica degraded."""
        try:
            repaired = await asyncio.to_thread(self._store.sync_mirror)
        except OSError:
            log.exception("could not sync the disk mirror with Redis; retried at the next reconciliation")
            return
        self._metrics.mirror_repairs.inc(repaired)

    def _set_up(self) -> None:
        if not self.healthy:
            log.info("Redis registry reachable: change notices on %s", self._store.channel)
        self.problem = ""
        self._connected.set()
        self._metrics.store_up.set(1)

    def _set_down(self, problem: str) -> None:
        if self.healthy:
            log.warning("lost the Redis registry (%s): degraded until it is back", problem)
        self._store.mark_unavailable()
        self.problem = problem
        self._connected.clear()
        self._metrics.store_up.set(0)
