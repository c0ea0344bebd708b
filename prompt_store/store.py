"""The `PromptStore` protocol every backend implements."""

from __future__ import annotations

from typing import Protocol

from prompt_store.prompt import SoftPrompt
from prompt_store.records import TaskMetadata, TaskRecord


class PromptStore(Protocol):
    """Versioned prompts per (tenant, task). Versions are immutable; only `active_version` moves."""

    def add_version(
        self,
        tenant: str,
        task_id: str,
        prompt: SoftPrompt,
        metadata: TaskMetadata | None = None,
        activate: bool = True,
        model: str = "",
    ) -> TaskRecord: ...

    def get_task(self, tenant: str, task_id: str) -> TaskRecord: ...

    def list_tasks(self, tenant: str) -> list[TaskRecord]: ...

    def load_prompt(self, tenant: str, task_id: str, version: int) -> SoftPrompt: ...

    def activate(self, tenant: str, task_id: str, version: int) -> TaskRecord: ...

    def delete_task(self, tenant: str, task_id: str) -> None: ...
