"""A tenant's tasks listed a page at a time, in task id order, from the store's index of task ids.

A page reads only its own records, whatever the tenant holds. The cursor a page hands on is opaque to clients
(it encodes the last task id the page covered): the next page starts after it, so a client walking the pages
sees every task that exists throughout the walk exactly once, while other tasks are added or deleted.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from prompt_store import TaskRecord, is_valid_task_id
from server.errors import InvalidParameter

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_CURSOR_CHARS = 200
CURSOR_PREFIX = "after:"


@dataclass(frozen=True)
class TaskPage:
    records: list[TaskRecord]
    next_cursor: str | None  # None: no task follows this page

    @property
    def has_more(self) -> bool:
        return self.next_cursor is not None


def encode_cursor(task_id: str) -> str:
    return base64.urlsafe_b64encode(f"{CURSOR_PREFIX}{task_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The task id a cursor from `encode_cursor` names; `InvalidParameter` (422) for anything else."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    task_id = text.removeprefix(CURSOR_PREFIX)
    if not text.startswith(CURSOR_PREFIX) or not is_valid_task_id(task_id):
        raise InvalidParameter(
            "query.cursor", "cursor is not one this server handed out; omit it to start from the top"
        )
    return task_id
