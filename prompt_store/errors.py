"""Errors raised by the prompt registry; the server maps each one to an HTTP status in one place."""

from __future__ import annotations

from typing import ClassVar


class RetryLater(Exception):
    """Refused for now, not for good: the caller may retry after `retry_after_s` (HTTP's `Retry-After`).

    The one base of every transient refusal (a full queue, a rate limit, a store that is down...). It lives
    here, in the lowest package, so that every layer can raise one.
    """

    default_retry_after_s: ClassVar[float] = 1.0

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = self.default_retry_after_s if retry_after_s is None else retry_after_s


class PromptStoreError(Exception):
    """Base class: the message is written for the client and is safe to show."""


class InvalidPrompt(PromptStoreError):
    """The tensor is not a usable soft prompt (rank, width, values, length)."""


class UnsupportedFormat(PromptStoreError):
    """The uploaded bytes are not one of the accepted prompt file formats."""


class TaskNotFound(PromptStoreError):
    def __init__(self, task_id: str) -> None:
        super().__init__(f"task '{task_id}' does not exist")
        self.task_id = task_id


class VersionNotFound(PromptStoreError):
    def __init__(self, task_id: str, version: int) -> None:
        super().__init__(f"task '{task_id}' has no version {version}")
        self.task_id = task_id
        self.version = version


class StoreUnavailable(PromptStoreError, RetryLater):
    """The backing store cannot take writes right now (e.g. Redis is down)."""
