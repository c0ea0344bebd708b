"""What every replica must agree on about keeping prompts resident: the pinned tasks, and how much each task was
used (warm-up reads the most used). Kept apart from task records: a pin is a serving choice, not a version.

Disk: two JSON files beside the prompts (one process). Redis: a set of pins and a sorted set of use counts,
shared by every replica. Use counts are bounded: past `MAX_USAGE_ENTRIES` tasks, the least used are dropped.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

import redis

from prompt_store.atomic import write_atomically
from prompt_store.errors import StoreUnavailable

TaskKey = tuple[str, str]  # tenant, task_id
T = TypeVar("T")
MAX_USAGE_ENTRIES = 10_000
PINS_FILE = "pins.json"
USAGE_FILE = "usage.json"


class ResidencyStore(Protocol):
    def pins(self) -> set[TaskKey]: ...

    def pin(self, tenant: str, task_id: str) -> None: ...

    def unpin(self, tenant: str, task_id: str) -> None: ...

    def add_usage(self, counts: Mapping[TaskKey, int]) -> None:
        """Adds `counts` to the stored use counts (one write however many tasks)."""
        ...

    def most_used(self, limit: int) -> list[TaskKey]:
        """The `limit` most used tasks, most used first."""
        ...


def _member(key: TaskKey) -> str:
    return f"{key[0]}/{key[1]}"


def _key(member: str | bytes) -> TaskKey:
    text = member.decode() if isinstance(member, bytes) else member
    tenant, _, task_id = text.partition("/")
    return tenant, task_id


class DiskResidency:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()

    def _read(self, name: str, empty: Any) -> Any:
        try:
            return json.loads((self.root / name).read_text())
        except (FileNotFoundError, ValueError):
            return empty

    def pins(self) -> set[TaskKey]:
        return {_key(m) for m in self._read(PINS_FILE, [])}

    def pin(self, tenant: str, task_id: str) -> None:
        self._change_pins(lambda pins: pins | {(tenant, task_id)})

    def unpin(self, tenant: str, task_id: str) -> None:
        self._change_pins(lambda pins: pins - {(tenant, task_id)})

    def _change_pins(self, change: Any) -> None:
        with self._lock:
            pins = change(self.pins())
            write_atomically(self.root / PINS_FILE, json.dumps(sorted(_member(k) for k in pins)).encode())

    def add_usage(self, counts: Mapping[TaskKey, int]) -> None:
        with self._lock:
            usage: dict[str, int] = self._read(USAGE_FILE, {})
            for key, count in counts.items():
                usage[_member(key)] = usage.get(_member(key), 0) + count
            kept = dict(sorted(usage.items(), key=lambda item: -item[1])[:MAX_USAGE_ENTRIES])
            write_atomically(self.root / USAGE_FILE, json.dumps(kept).encode())

    def most_used(self, limit: int) -> list[TaskKey]:
        usage: dict[str, int] = self._read(USAGE_FILE, {})
        return [_key(m) for m, _ in sorted(usage.items(), key=lambda item: -item[1])[:limit]]


class RedisResidency:
    def __init__(self, client: Any, namespace: str) -> None:
        self.client = client
        self.pins_key = f"{namespace}:pins"
        self.usage_key = f"{namespace}:usage"

    def pins(self) -> set[TaskKey]:
        return {_key(m) for m in _answered(lambda: self.client.smembers(self.pins_key))}

    def pin(self, tenant: str, task_id: str) -> None:
        _answered(lambda: self.client.sadd(self.pins_key, _member((tenant, task_id))))

    def unpin(self, tenant: str, task_id: str) -> None:
        _answered(lambda: self.client.srem(self.pins_key, _member((tenant, task_id))))

    def add_usage(self, counts: Mapping[TaskKey, int]) -> None:
        pipe = self.client.pipeline(transaction=True)
        for key, count in counts.items():
            pipe.zincrby(self.usage_key, count, _member(key))
        pipe.zremrangebyrank(self.usage_key, 0, -MAX_USAGE_ENTRIES - 1)  # keeps the most used
        _answered(pipe.execute)

    def most_used(self, limit: int) -> list[TaskKey]:
        if limit <= 0:
            return []
        return [_key(m) for m in _answered(lambda: self.client.zrevrange(self.usage_key, 0, limit - 1))]


def _answered(operation: Callable[[], T]) -> T:
    """Runs one Redis operation; Redis trouble is `StoreUnavailable` (503 with Retry-After), never a 500."""
    try:
        return operation()
    except redis.RedisError as error:
        raise StoreUnavailable(f"the prompt registry's Redis cannot be used now: {error}") from error
