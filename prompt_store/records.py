"""Registry records: a task, its metadata and its immutable prompt versions."""

from __future__ import annotations

import re
import time
from typing import Any

from pydantic import BaseModel, Field

TASK_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_TASK_ID = re.compile(TASK_ID_PATTERN)


def is_valid_task_id(task_id: str) -> bool:
    return bool(_TASK_ID.match(task_id))


class VersionInfo(BaseModel):
    version: int
    length: int
    d_model: int
    sha256: str
    model: str = ""
    created_at: float = Field(default_factory=time.time)


class TaskMetadata(BaseModel):
    """What a client may set on a task; every field is optional on upload."""

    labels: list[str] | None = None
    description: str | None = None
    input_template: str | None = None
    parameters: dict[str, Any] | None = None


class TaskRecord(BaseModel):
    tenant: str
    task_id: str
    active_version: int | None = None
    versions: list[VersionInfo] = Field(default_factory=list)
    metadata: TaskMetadata = Field(default_factory=TaskMetadata)
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)

    def version_info(self, version: int) -> VersionInfo | None:
        return next((v for v in self.versions if v.version == version), None)

    @property
    def next_version(self) -> int:
        return max((v.version for v in self.versions), default=0) + 1

    def with_new_version(self, info: VersionInfo, metadata: TaskMetadata | None, activate: bool) -> TaskRecord:
        merged = self.metadata.model_copy(update=metadata.model_dump(exclude_none=True)) if metadata else self.metadata
        return self.model_copy(
            update={
                "versions": [*self.versions, info],
                "active_version": info.version if activate or self.active_version is None else self.active_version,
                "metadata": merged,
                "updated_at": time.time(),
            }
        )
