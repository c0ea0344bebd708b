"""`PromptRegistry`: the server's view of the prompt store, with device-resident prompts.

Requests resolve (tenant, task, version) to a prompt tensor on the model's device. Task records and
prompt tensors are cached; a cold prompt is loaded on a thread, so the event loop (and every other
request) never waits on storage. Writes go through here so the caches are dropped at once; changes
made by other replicas arrive through `refresh` (see `server.registry.sync`).

A request keeps the prompt it resolved: the device cache is keyed by content (sha256), and the request
holds its own reference to the tensor, so a new version or a delete never changes a request in flight.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

from prompt_store import (
    PromptStore,
    SoftPrompt,
    TaskMetadata,
    TaskNotFound,
    TaskRecord,
    VersionInfo,
    VersionNotFound,
)
from prompt_store.redis_store import unknown_version
from prompt_store.residency import ResidencyStore
from prompt_store.store import LoadSource
from server.metrics import ServerMetrics
from server.registry.device_cache import DevicePromptCache
from server.registry.listing import TaskPage, decode_cursor, encode_cursor
from server.stopping import cancel_and_wait

log = logging.getLogger(__name__)

TaskKey = tuple[str, str]
# Where a request's prompt came from (`softserve_prompt_loads_total{source}`): the device cache, or a store.
PromptSource = Literal["cache", LoadSource]
PROMPT_SOURCES: tuple[PromptSource, ...] = get_args(PromptSource)


@dataclass(frozen=True)
class ResolvedPrompt:
    task: TaskRecord
    version: int
    embeddings: torch.Tensor  # on the model's device and dtype


PromptKey = tuple[str, str, int, str]  # tenant, task, version, sha256
# Uses are counted here and added to the store's counts every this many requests (and at stop).
USAGE_FLUSH_EVERY = 100


class PromptRegistry:
    def __init__(
        self,
        store: PromptStore,
        to_device: Callable[[torch.Tensor], torch.Tensor],
        cache_bytes: int,
        metrics: ServerMetrics | None = None,
        pinned: Iterable[TaskKey] = (),
        residency: ResidencyStore | None = None,
    ) -> None:
        """`pinned`: the `preload_tasks` setting; `residency`: the pins set through the API and the use counts
        that warm-up reads, shared with the other replicas (None: neither, as in tools and some tests)."""
        self.store = store
        self._to_device = to_device
        self._records: dict[TaskKey, TaskRecord] = {}
        # Bumped by `forget`: a record or pin fetched across a change is not kept (it may be stale).
        self._generations: dict[TaskKey, int] = {}
        self._prompts = DevicePromptCache(cache_bytes, metrics)
        self._loading: dict[PromptKey, asyncio.Future[torch.Tensor]] = {}
        self._metrics = metrics
        self.configured_pins = frozenset(pinned)
        self.pinned_tasks: set[TaskKey] = set(pinned)  # and the store's pins (`refresh_pins`)
        self._residency = residency
        self._usage: Counter[TaskKey] = Counter()
        self._background: set[asyncio.Task[None]] = set()

    async def resolve(
        self, tenant: str, task_id: str, version: int | None = None, *, used: bool = True
    ) -> ResolvedPrompt:
        """The prompt a request uses; `used` False for loads that are not requests (preload, warm-up, pin)."""
        generation = self._generations.get((tenant, task_id), 0)
        record = await self.task(tenant, task_id)
        chosen = version if version is not None else record.active_version
        if chosen is None:
            raise TaskNotFound(task_id)
        info = record.version_info(chosen)
        if info is None:
            record, info = await self._record_with_version(tenant, task_id, chosen, generation)
        key = (tenant, task_id, chosen, info.sha256)
        tensor = self._prompts.get(key)
        if tensor is None:
            tensor = await self._load(key)
        else:
            self._count_load("cache")
        pin = (tenant, task_id) in self.pinned_tasks and chosen == record.active_version
        if pin and self._generations.get((tenant, task_id), 0) == generation:
            self._prompts.put(key, tensor, pinned=True)
        if used:
            self._count_use(tenant, task_id)
        return ResolvedPrompt(task=record, version=chosen, embeddings=tensor)

    async def task(self, tenant: str, task_id: str) -> TaskRecord:
        key = (tenant, task_id)
        record = self._records.get(key)
        if record is None:
            generation = self._generations.get(key, 0)
            record = await asyncio.to_thread(self.store.get_task, tenant, task_id)
            self._keep_record(key, generation, record)
        return record

    def _keep_record(self, key: TaskKey, generation: int, record: TaskRecord) -> None:
        """Caches a record fetched since `generation`, unless a change was noticed meanwhile (it may be stale)."""
        if self._generations.get(key, 0) == generation:
            self._records[key] = record

    async def _record_with_version(
        self, tenant: str, task_id: str, version: int, generation: int
    ) -> tuple[TaskRecord, VersionInfo]:
        """The cached record lacks `version`, but it may be older than the store's (a notice still on its way):
        the store decides. While Redis is unreachable its disk mirror cannot tell that a version does not exist."""
        record, mirrored = await asyncio.to_thread(self._fetch_task, tenant, task_id)
        info = record.version_info(version)
        if info is not None:
            self._keep_record((tenant, task_id), generation, record)
            return record, info
        if mirrored:
            raise unknown_version(task_id, version)
        raise VersionNotFound(task_id, version)

    def _fetch_task(self, tenant: str, task_id: str) -> tuple[TaskRecord, bool]:
        """The task's record, and whether it is only the disk mirror's copy (Redis unreachable)."""
        record, source = self.store.get_task_traced(tenant, task_id)
        return record, source != self.store.primary

    async def _load(self, key: PromptKey) -> torch.Tensor:
        """Loads a cold prompt once, however many requests ask for it at the same time."""
        pending = self._loading.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        try:
            tenant, task_id, version, _ = key
            # where it came from: Redis, or the disk mirror while Redis is down
            prompt, source = await asyncio.to_thread(self.store.load_prompt_traced, tenant, task_id, version)
            tensor = self._to_device(prompt.embeddings)
            self._prompts.put(key, tensor)
            self._count_load(source)
            self._count_store_lookup(source)
            future.set_result(tensor)
            return tensor
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._loading[key]

    def _count_load(self, source: PromptSource) -> None:
        if self._metrics is not None:
            self._metrics.prompt_loads.labels(source=source).inc()

    def _count_store_lookup(self, source: LoadSource) -> None:
        """A device miss found in `source`: the primary store, or the disk mirror after missing Redis."""
        if self._metrics is not None:
            if source != self.store.primary:
                self._metrics.prompt_lookups.labels(tier=self.store.primary, result="miss").inc()
            self._metrics.prompt_lookups.labels(tier=source, result="hit").inc()

    # Residency: use counts, pins, warm-up

    def _count_use(self, tenant: str, task_id: str) -> None:
        self._usage[(tenant, task_id)] += 1
        if self._residency is not None and self._usage.total() >= USAGE_FLUSH_EVERY:
            self._in_background(self.flush_usage())

    async def flush_usage(self) -> None:
        """Adds this replica's use counts since the last flush to the store's (kept here if the store fails)."""
        counts, self._usage = self._usage, Counter()
        if self._residency is None or not counts:
            return
        try:
            await asyncio.to_thread(self._residency.add_usage, counts)
        except Exception:
            log.warning("use counts not written (kept for the next flush)", exc_info=True)
            self._usage.update(counts)

    def is_loaded(self, record: TaskRecord) -> bool:
        """Whether the task's active prompt is on this replica's device now."""
        active = record.active_version
        info = record.version_info(active) if active is not None else None
        return info is not None and (record.tenant, record.task_id, info.version, info.sha256) in self._prompts

    @property
    def cache_budget(self) -> int:
        return self._prompts.budget_bytes

    def is_pinned(self, tenant: str, task_id: str) -> bool:
        return (tenant, task_id) in self.pinned_tasks

    def pinned_count(self, tenant: str) -> int:
        """The tenant's pins through the API (the operator's `preload_tasks` are not charged to the tenant)."""
        return sum(1 for key in self.pinned_tasks - self.configured_pins if key[0] == tenant)

    async def refresh_pins(self) -> None:
        """Takes the store's pins (set on any replica); a task unpinned elsewhere becomes evictable here."""
        if self._residency is None:
            return
        stored = await asyncio.to_thread(self._residency.pins)
        pins = set(self.configured_pins) | stored
        dropped = self.pinned_tasks - pins
        self.pinned_tasks = pins
        if dropped:
            self._prompts.unpin(lambda k: (k[0], k[1]) in dropped)

    async def pin_cost(self, tenant: str, task_id: str) -> tuple[int, int]:
        """Loads the task's active prompt; returns its bytes on the device, and the bytes of the cache's budget
        that other pinned prompts leave free."""
        resolved = await self.resolve(tenant, task_id, used=False)
        size = resolved.embeddings.numel() * resolved.embeddings.element_size()
        mine = self._prompt_key(resolved)
        held = self._prompts.pinned_bytes - (size if self._prompts.is_pinned(mine) else 0)
        return size, self._prompts.budget_bytes - held

    async def pin(self, tenant: str, task_id: str) -> None:
        """Pins the task (its active version, whichever that is) here and in the store, for every replica."""
        if self._residency is not None:
            await asyncio.to_thread(self._residency.pin, tenant, task_id)
        self.pinned_tasks.add((tenant, task_id))
        await self.resolve(tenant, task_id, used=False)  # a pinned task's active prompt is put pinned

    async def unpin(self, tenant: str, task_id: str) -> None:
        if self._residency is not None:
            await asyncio.to_thread(self._residency.unpin, tenant, task_id)
        if (tenant, task_id) not in self.configured_pins:
            self.pinned_tasks.discard((tenant, task_id))
            self._prompts.unpin(lambda k: k[0] == tenant and k[1] == task_id)

    async def warm_up(self, limit: int) -> int:
        """Loads the `limit` most used tasks (by the store's counts) not pinned already; returns how many loaded.
        The least used load first, so if the cache cannot hold them all, the most used stay."""
        if self._residency is None or limit <= 0:
            return 0
        try:
            wanted = await asyncio.to_thread(self._residency.most_used, limit)
        except Exception:
            log.warning("warm-up skipped: the use counts cannot be read", exc_info=True)
            return 0
        loaded = 0
        for tenant, task_id in reversed(wanted):
            if (tenant, task_id) not in self.pinned_tasks:
                await self._preload_task(tenant, task_id, quiet=True)
                loaded += self._resident(tenant, task_id)
        log.info("warm-up: %d of the %d most used prompts loaded", loaded, len(wanted))
        return loaded

    @staticmethod
    def _prompt_key(resolved: ResolvedPrompt) -> PromptKey:
        info = resolved.task.version_info(resolved.version)
        assert info is not None  # resolve found it
        return (resolved.task.tenant, resolved.task.task_id, resolved.version, info.sha256)

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # Keeping in step with changes (here, or notices and reconciliation from other replicas)

    def forget(self, tenant: str, task_id: str) -> None:
        """Drops cached state of a task (after a change here or a change notice from elsewhere)."""
        key = (tenant, task_id)
        self._generations[key] = self._generations.get(key, 0) + 1
        self._records.pop(key, None)
        self._prompts.discard(lambda k: k[0] == tenant and k[1] == task_id)

    def refresh(self, tenant: str, task_id: str, updated_at: float | None = None) -> bool:
        """Drops a task's cached state unless it is already the state stamped `updated_at`; reloads it if pinned.

        Returns True when something was dropped.
        """
        cached = self._records.get((tenant, task_id))
        if updated_at is not None and cached is not None and cached.updated_at == updated_at:
            return False
        self.forget(tenant, task_id)
        self._reload_pinned(tenant, task_id)
        return cached is not None

    def cached_records(self) -> dict[TaskKey, TaskRecord]:
        return dict(self._records)

    async def preload(self, only_missing: bool = False) -> None:
        """Loads every pinned task's active prompt (start-up), or those not resident (reconciliation)."""
        try:
            await self.refresh_pins()
        except Exception:
            log.warning("the store's pins cannot be read; retried at the next reconciliation", exc_info=True)
        for tenant, task_id in sorted(self.pinned_tasks):
            if not (only_missing and self._resident(tenant, task_id)):
                await self._preload_task(tenant, task_id, quiet=only_missing)
        if self._prompts.pinned_bytes > self._prompts.budget_bytes:
            log.warning("pinned prompts (%d bytes) exceed prompt_cache_mb", self._prompts.pinned_bytes)

    def _resident(self, tenant: str, task_id: str) -> bool:
        record = self._records.get((tenant, task_id))
        info = record.version_info(record.active_version) if record and record.active_version else None
        return info is not None and (tenant, task_id, info.version, info.sha256) in self._prompts

    async def _preload_task(self, tenant: str, task_id: str, quiet: bool = False) -> None:
        try:
            await self.resolve(tenant, task_id, used=False)
        except (TaskNotFound, VersionNotFound):
            log.log(logging.DEBUG if quiet else logging.WARNING, "preload: no task %s/%s (yet)", tenant, task_id)
        except Exception:
            log.exception("preload of %s/%s failed; it is retried at the next reconciliation", tenant, task_id)

    def _reload_pinned(self, tenant: str, task_id: str) -> None:
        if (tenant, task_id) in self.pinned_tasks:
            self._in_background(self._preload_task(tenant, task_id))

    async def _write(self, tenant: str, task_id: str, write: Callable[[], TaskRecord]) -> TaskRecord:
        """Runs a store write, drops what was cached and keeps the record the store returned, unless
        another change was noticed meanwhile (then the next request reads the store)."""
        generation = self._generations.get((tenant, task_id), 0)
        record = await asyncio.to_thread(write)
        unchanged = self._generations.get((tenant, task_id), 0) == generation
        self.forget(tenant, task_id)
        if unchanged:
            self._records[(tenant, task_id)] = record
        self._reload_pinned(tenant, task_id)
        return record

    # Writes: the store call runs on a thread; the caches change on the event loop.

    async def add_version(
        self,
        tenant: str,
        task_id: str,
        prompt: SoftPrompt,
        metadata: TaskMetadata | None,
        activate: bool,
        model: str,
    ) -> TaskRecord:
        return await self._write(
            tenant, task_id, lambda: self.store.add_version(tenant, task_id, prompt, metadata, activate, model)
        )

    async def activate(self, tenant: str, task_id: str, version: int) -> TaskRecord:
        return await self._write(tenant, task_id, lambda: self.store.activate(tenant, task_id, version))

    async def set_ensemble(self, tenant: str, task_id: str, versions: list[int]) -> TaskRecord:
        return await self._write(tenant, task_id, lambda: self.store.set_ensemble(tenant, task_id, versions))

    async def delete(self, tenant: str, task_id: str) -> None:
        await asyncio.to_thread(self.store.delete_task, tenant, task_id)
        self.forget(tenant, task_id)
        await self.unpin(tenant, task_id)  # a task uploaded again under this id starts unpinned

    async def tasks(self, tenant: str, task_ids: Sequence[str]) -> list[TaskRecord]:
        """The records of `task_ids` in their order (tasks gone meanwhile left out): the cached ones, and the
        others read from the store in one call and cached, so notices and reconciliation keep them current."""
        found = {t: record for t in task_ids if (record := self._records.get((tenant, t))) is not None}
        missing = [t for t in task_ids if t not in found]
        if missing:
            generations = {t: self._generations.get((tenant, t), 0) for t in missing}
            for record in await asyncio.to_thread(self.store.get_tasks, tenant, missing):
                self._keep_record((tenant, record.task_id), generations[record.task_id], record)
                found[record.task_id] = record
        return [found[t] for t in task_ids if t in found]

    async def list_tasks(self, tenant: str) -> list[TaskRecord]:
        """Every task of the tenant, each record read from the store (listings read a page: `task_page`)."""
        return await asyncio.to_thread(self.store.list_tasks, tenant)

    async def task_ids(self, tenant: str) -> list[str]:
        """Every task id of the tenant, from the store's index (no record is read)."""
        return await asyncio.to_thread(self.store.task_ids, tenant)

    async def task_page(self, tenant: str, cursor: str | None, limit: int) -> TaskPage:
        """Up to `limit` tasks after the cursor (from the start: None), and the cursor of the next page."""
        after = decode_cursor(cursor) if cursor is not None else None
        task_ids = await asyncio.to_thread(self.store.task_ids, tenant, after, limit + 1)
        shown = task_ids[:limit]
        more = len(task_ids) > limit
        return TaskPage(await self.tasks(tenant, shown), encode_cursor(shown[-1]) if more else None)

    async def count_tasks(self, tenant: str) -> int:
        return await asyncio.to_thread(self.store.count_tasks, tenant)

    async def load_prompt(self, tenant: str, task_id: str, version: int) -> SoftPrompt:
        return await asyncio.to_thread(self.store.load_prompt, tenant, task_id, version)

    async def stop(self) -> None:
        await self.flush_usage()
        await cancel_and_wait(*self._background)
