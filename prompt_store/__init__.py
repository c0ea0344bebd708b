"""Versioned soft-prompt registry: the prompt type, its file formats and storage backends.

Used by the server, the trainer and the CLI; imports nothing from `server`.
"""

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
