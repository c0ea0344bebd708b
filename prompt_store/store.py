"""The `PromptStore` protocol every backend implements."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

from prompt_store.prompt import SoftPrompt
from prompt_store.records import TaskMetadata, TaskRecord

LoadSource = Literal["redis", "disk"]


class PromptStore(Protocol):
    """Versioned prompts per (tenant, task). Versions are immutable; only `active_version` moves."""

    # Where the store's own answers come from; a traced answer from elsewhere is a fallback's (a mirror's).
    primary: LoadSource

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

    def get_task_traced(self, tenant: str, task_id: str) -> tuple[TaskRecord, LoadSource]:
        """The record and where it came from (Redis, or a disk: the store's own, or Redis's mirror)."""
        ...

    def list_tasks(self, tenant: str) -> list[TaskRecord]:
        """Every task of the tenant, by task id: it reads every record (see `task_ids` for a page)."""
        ...

    def task_ids(self, tenant: str, after: str | None = None, limit: int | None = None) -> list[str]:
        """The tenant's task ids in order, those after `after` only, at most `limit`: from an index, no record is
        read, so a page of a listing costs its own records only."""
        ...

    def get_tasks(self, tenant: str, task_ids: Sequence[str]) -> list[TaskRecord]:
        """The records of `task_ids` in their order; a task that does not exist (deleted meanwhile) is left out."""
        ...

    def count_tasks(self, tenant: str) -> int:
        """How many tasks the tenant has, from the index (no record is read)."""
        ...

    def load_prompt(self, tenant: str, task_id: str, version: int) -> SoftPrompt: ...

    def load_prompt_traced(self, tenant: str, task_id: str, version: int) -> tuple[SoftPrompt, LoadSource]: ...

    def activate(self, tenant: str, task_id: str, version: int) -> TaskRecord: ...

    def set_ensemble(self, tenant: str, task_id: str, versions: list[int]) -> TaskRecord:
        """Makes `versions` (each one of the task's) its ensemble; `[]` clears it. `VersionNotFound` changes nothing."""
        ...

    def delete_task(self, tenant: str, task_id: str) -> None: ...
