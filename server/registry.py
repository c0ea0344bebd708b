"""`PromptRegistry`: the server's view of the prompt store, with device-resident prompts.

Requests resolve (tenant, task, version) to a prompt tensor on the model's device. Task records and
prompt tensors are cached; a cold prompt is loaded on a thread, so the event loop (and every other
request) never waits on storage. Writes go through here so the caches are dropped at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import torch

from prompt_store import (
    PromptStore,
    SoftPrompt,
    TaskMetadata,
    TaskNotFound,
    TaskRecord,
    VersionNotFound,
)
from server.metrics import ServerMetrics
from server.prompt_cache import DevicePromptCache

TaskKey = tuple[str, str]


@dataclass(frozen=True)
class ResolvedPrompt:
    task: TaskRecord
    version: int
    embeddings: torch.Tensor  # on the model's device and dtype


class PromptRegistry:
    def __init__(
        self,
        store: PromptStore,
        to_device: Callable[[torch.Tensor], torch.Tensor],
        cache_bytes: int,
        metrics: ServerMetrics | None = None,
        source: str = "disk",
    ) -> None:
        self.store = store
        self._to_device = to_device
        self._records: dict[TaskKey, TaskRecord] = {}
        self._prompts = DevicePromptCache(cache_bytes, metrics)
        self._loading: dict[tuple[str, str, int, str], asyncio.Future[torch.Tensor]] = {}
        self._metrics = metrics
        self._source = source

    async def resolve(self, tenant: str, task_id: str, version: int | None = None) -> ResolvedPrompt:
        record = await self.task(tenant, task_id)
        chosen = version if version is not None else record.active_version
        if chosen is None:
            raise TaskNotFound(task_id)
        info = record.version_info(chosen)
        if info is None:
            raise VersionNotFound(task_id, chosen)
        key = (tenant, task_id, chosen, info.sha256)
        tensor = self._prompts.get(key)
        if tensor is None:
            tensor = await self._load(key)
        return ResolvedPrompt(task=record, version=chosen, embeddings=tensor)

    async def task(self, tenant: str, task_id: str) -> TaskRecord:
        record = self._records.get((tenant, task_id))
        if record is None:
            record = await asyncio.to_thread(self.store.get_task, tenant, task_id)
            self._records[(tenant, task_id)] = record
        return record

    async def _load(self, key: tuple[str, str, int, str]) -> torch.Tensor:
        """Loads a cold prompt once, however many requests ask for it at the same time."""
        pending = self._loading.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        try:
            tenant, task_id, version, _ = key
            prompt = await asyncio.to_thread(self.store.load_prompt, tenant, task_id, version)
            tensor = self._to_device(prompt.embeddings)
            self._prompts.put(key, tensor)
            if self._metrics is not None:
                self._metrics.prompt_loads.labels(source=self._source).inc()
            future.set_result(tensor)
            return tensor
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._loading[key]

    def forget(self, tenant: str, task_id: str) -> None:
        """Drops cached state of a task (after a change here or a change notice from elsewhere)."""
        self._records.pop((tenant, task_id), None)
        self._prompts.discard(lambda key: key[0] == tenant and key[1] == task_id)

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
        record = await asyncio.to_thread(self.store.add_version, tenant, task_id, prompt, metadata, activate, model)
        self._records[(tenant, task_id)] = record
        return record

    async def activate(self, tenant: str, task_id: str, version: int) -> TaskRecord:
        record = await asyncio.to_thread(self.store.activate, tenant, task_id, version)
        self._records[(tenant, task_id)] = record
        return record

    async def delete(self, tenant: str, task_id: str) -> None:
        await asyncio.to_thread(self.store.delete_task, tenant, task_id)
        self.forget(tenant, task_id)

    async def list_tasks(self, tenant: str) -> list[TaskRecord]:
        return await asyncio.to_thread(self.store.list_tasks, tenant)

    async def load_prompt(self, tenant: str, task_id: str, version: int) -> SoftPrompt:
        return await asyncio.to_thread(self.store.load_prompt, tenant, task_id, version)
