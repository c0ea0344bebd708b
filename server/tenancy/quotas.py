"""`TaskQuota`: how many tasks a tenant may keep. Asked by every path that can create a task: an upload, and
a training job (whose result becomes a task), so both refuse alike."""

from __future__ import annotations

from prompt_store import TaskNotFound
from server.errors import RateLimited
from server.registry.registry import PromptRegistry

QUOTA_RETRY_AFTER_S = 60


class TaskQuota:
    def __init__(self, registry: PromptRegistry, max_tasks: int) -> None:
        """`max_tasks` 0: no limit."""
        self.registry = registry
        self.max_tasks = max_tasks

    async def check(self, tenant: str, task_id: str) -> None:
        """Raises `RateLimited` when `task_id` would be a new task past the tenant's quota (a new version of a
        stored task is not a new task)."""
        if not self.max_tasks or await self.registry.count_tasks(tenant) < self.max_tasks:
            return
        try:
            await self.registry.task(tenant, task_id)  # counted from the index: only a tenant at its quota reads
        except TaskNotFound:
            raise RateLimited(
                f"this tenant's quota of {self.max_tasks} tasks is used; delete a task first",
                retry_after_s=QUOTA_RETRY_AFTER_S,
            ) from None
