"""Versioned soft-prompt registry: the prompt type, its file formats and storage backends.

Used by the server, the trainer and the CLI; imports nothing from `server`. Its names are loaded when first used
(PEP 562): the task-id rules and records need no torch, and a CLI command that only checks a task id should not
pay torch's seconds of import.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prompt_store.disk import DiskStore
    from prompt_store.errors import (
        InvalidPrompt,
        PromptStoreError,
        StoreUnavailable,
        TaskNotFound,
        UnsupportedFormat,
        VersionNotFound,
    )
    from prompt_store.formats import PromptFormat, dump_prompt, load_prompt_bytes
    from prompt_store.prompt import SoftPrompt, validate_prompt
    from prompt_store.records import TASK_ID_PATTERN, TaskMetadata, TaskRecord, VersionInfo, is_valid_task_id
    from prompt_store.redis_store import RedisStore
    from prompt_store.store import PromptStore

_MODULE_OF = {
    "DiskStore": "prompt_store.disk",
    "InvalidPrompt": "prompt_store.errors",
    "PromptStoreError": "prompt_store.errors",
    "StoreUnavailable": "prompt_store.errors",
    "TaskNotFound": "prompt_store.errors",
    "UnsupportedFormat": "prompt_store.errors",
    "VersionNotFound": "prompt_store.errors",
    "PromptFormat": "prompt_store.formats",
    "dump_prompt": "prompt_store.formats",
    "load_prompt_bytes": "prompt_store.formats",
    "SoftPrompt": "prompt_store.prompt",
    "validate_prompt": "prompt_store.prompt",
    "TASK_ID_PATTERN": "prompt_store.records",
    "TaskMetadata": "prompt_store.records",
    "TaskRecord": "prompt_store.records",
    "VersionInfo": "prompt_store.records",
    "is_valid_task_id": "prompt_store.records",
    "RedisStore": "prompt_store.redis_store",
    "PromptStore": "prompt_store.store",
}


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "TASK_ID_PATTERN",
    "DiskStore",
    "InvalidPrompt",
    "PromptFormat",
    "PromptStore",
    "PromptStoreError",
    "RedisStore",
    "SoftPrompt",
    "StoreUnavailable",
    "TaskMetadata",
    "TaskNotFound",
    "TaskRecord",
    "UnsupportedFormat",
    "VersionInfo",
    "VersionNotFound",
    "dump_prompt",
    "is_valid_task_id",
    "load_prompt_bytes",
    "validate_prompt",
]
