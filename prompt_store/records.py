"""Registry records: a task, its metadata and its immutable prompt versions."""

from __future__ import annotations

import re
import time
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field

TASK_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
INPUT_PLACEHOLDER = "{input}"  # where a task's `input_template` puts the input
MAX_ENSEMBLE_SIZE = 16  # members of a task's ensemble: each one is a row per input of an ensemble request
_TASK_ID = re.compile(TASK_ID_PATTERN)


def is_valid_task_id(task_id: str) -> bool:
    return bool(_TASK_ID.match(task_id))


def text_problem(text: str) -> str | None:
    """Why `text` is not Unicode text, or None. A lone surrogate (JSON's `"\\ud800"`) is a `str` Python
    accepts, but it cannot be encoded as UTF-8: tokenizers, stores and JSON writers all fail on it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        code_point = ord(text[error.start])
        return f"holds a lone surrogate (U+{code_point:04X} at character {error.start}); text must be valid Unicode"
    return None


def _valid_unicode(text: str) -> str:
    problem = text_problem(text)
    if problem:
        raise ValueError(problem)
    return text


# A string every tokenizer and store can take: valid Unicode, so UTF-8 encodable.
Utf8Text = Annotated[str, AfterValidator(_valid_unicode)]


class VersionInfo(BaseModel):
    version: int
    length: int
    d_model: int
    sha256: str
    model: str = ""
    created_at: float = Field(default_factory=time.time)


class TaskMetadata(BaseModel):
    """What a client may set on a task; every field is optional on upload."""

    labels: list[Utf8Text] | None = None
    description: Utf8Text | None = None
    input_template: Utf8Text | None = None
    parameters: dict[str, Any] | None = None

    def merged(self, update: TaskMetadata | None) -> TaskMetadata:
        """This metadata with the fields `update` sets; the fields it leaves unset keep their value."""
        return self.model_copy(update=update.model_dump(exclude_none=True)) if update else self


class TaskRecord(BaseModel):
    tenant: str
    task_id: str
    active_version: int | None = None
    versions: list[VersionInfo] = Field(default_factory=list)
    metadata: TaskMetadata = Field(default_factory=TaskMetadata)
    ensemble: list[int] = Field(default_factory=list, description="versions served together by `ensemble` requests")
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)

    def version_info(self, version: int) -> VersionInfo | None:
        return next((v for v in self.versions if v.version == version), None)

    @property
    def next_version(self) -> int:
        return max((v.version for v in self.versions), default=0) + 1

    def with_new_version(self, info: VersionInfo, metadata: TaskMetadata | None, activate: bool) -> TaskRecord:
        return self.model_copy(
            update={
                "versions": [*self.versions, info],
                "active_version": info.version if activate or self.active_version is None else self.active_version,
                "metadata": self.metadata.merged(metadata),
                "updated_at": time.time(),
            }
        )
