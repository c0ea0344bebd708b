"""Errors raised by the prompt registry; the server maps each one to an HTTP status in one place."""


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


class StoreUnavailable(PromptStoreError):
    """The backing store cannot take writes right now (e.g. Redis is down)."""
