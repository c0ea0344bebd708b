"""Redis backend: tenant-namespaced keys, atomic scripted writes, change notices, and a disk mirror.

Layout (every name under `namespace`, default `softserve`; tenant and task ids cannot hold `:`):
- `{ns}:task:{tenant}:{task}`    hash: created_at, updated_at, active_version, last_version,
                                 `meta:<field>` (JSON), `version:<n>` (VersionInfo JSON without the version)
- `{ns}:prompts:{tenant}:{task}` hash: version -> the prompt as safetensors bytes (binary-safe)
- `{ns}:tasks:{tenant}`          set of the tenant's task ids; `{ns}:tenants` set of tenants
- `{ns}:populated`               marker: this Redis holds the registry (set after a rebuild from the mirror)
- `{ns}:changes`                 channel: one JSON notice per change (version, activate, delete, restore)

Each write is one Lua script (atomic; versions come from HINCRBY inside it, so replicas never race for a
number) that publishes its notice on commit. Then the change is written through to the disk mirror
under a per-task file lock, copying the task's state as Redis has it at that moment, so concurrent
writers from several replicas sharing one mirror directory leave it equal to Redis.

Redis down: reads fall back to the mirror; writes raise `StoreUnavailable` (HTTP 503). After a
connection failure Redis is skipped for `retry_interval_s`, so requests do not each wait on a dead socket.
"""

from __future__ import annotations

import fcntl
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Literal, TypeVar

import redis
import safetensors.torch
from redis.backoff import NoBackoff
from redis.retry import Retry

from prompt_store import redis_scripts as scripts
from prompt_store.disk import DiskStore
from prompt_store.errors import StoreUnavailable, TaskNotFound, VersionNotFound
from prompt_store.formats import PROMPT_KEY
from prompt_store.prompt import SoftPrompt
from prompt_store.records import TaskMetadata, TaskRecord, VersionInfo, is_valid_task_id

log = logging.getLogger(__name__)

T = TypeVar("T")
LoadSource = Literal["redis", "disk"]
TaskKey = tuple[str, str]

UNAVAILABLE = "the prompt registry's Redis is unavailable; prompt changes are refused until it is back"
REBUILD_LOCK_MS = 10 * 60 * 1000
STAMP_CHUNK = 1000


def prompt_bytes(prompt: SoftPrompt) -> bytes:
    """The stored form of a prompt: the same safetensors bytes as a disk store version file."""
    return safetensors.torch.save({PROMPT_KEY: prompt.embeddings}, metadata={"sha256": prompt.sha256})


def prompt_from_bytes(data: bytes) -> SoftPrompt:
    return SoftPrompt(safetensors.torch.load(data)[PROMPT_KEY])


def record_fields(record: TaskRecord) -> dict[str, str]:
    """A record as the fields of its Redis hash."""
    fields = {
        "created_at": repr(record.created_at),
        "updated_at": repr(record.updated_at),
        "last_version": str(record.next_version - 1),
    }
    if record.active_version is not None:
        fields["active_version"] = str(record.active_version)
    fields.update(metadata_fields(record.metadata))
    for info in record.versions:
        fields[f"version:{info.version}"] = info.model_dump_json(exclude={"version"})
    return fields


def metadata_fields(metadata: TaskMetadata | None) -> dict[str, str]:
    """The metadata fields a change sets (unset ones keep their value, as in `TaskRecord.with_new_version`)."""
    values = metadata.model_dump(exclude_none=True) if metadata else {}
    return {f"meta:{name}": json.dumps(value) for name, value in values.items()}


def record_from_fields(tenant: str, task_id: str, raw: dict[bytes, bytes]) -> TaskRecord:
    fields = {key.decode(): value for key, value in raw.items()}
    versions = [
        VersionInfo.model_validate({**json.loads(value), "version": int(name.removeprefix("version:"))})
        for name, value in fields.items()
        if name.startswith("version:")
    ]
    metadata = {
        name.removeprefix("meta:"): json.loads(value) for name, value in fields.items() if name.startswith("meta:")
    }
    active = fields.get("active_version")
    return TaskRecord(
        tenant=tenant,
        task_id=task_id,
        active_version=int(active) if active is not None else None,
        versions=sorted(versions, key=lambda v: v.version),
        metadata=TaskMetadata.model_validate(metadata),
        created_at=float(fields["created_at"]),
        updated_at=float(fields["updated_at"]),
    )


class RedisStore:
    """A `PromptStore` on Redis, written through to a `DiskStore` mirror (or Redis alone: `mirror=None`)."""

    def __init__(
        self,
        url: str,
        mirror: DiskStore | None = None,
        namespace: str = "softserve",
        timeout_s: float = 1.0,
        retry_interval_s: float = 1.0,
    ) -> None:
        self.url = url
        self.mirror = mirror
        self.namespace = namespace
        self.channel = f"{namespace}:changes"
        self._marker = f"{namespace}:populated"
        self.timeout_s = timeout_s
        self.retry_interval_s = retry_interval_s
        # One immediate retry: a pooled connection can be stale after a Redis restart. More would make
        # every request wait while Redis is down.
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
        )
        self._scripts = {
            name: self.client.register_script(source)
            for name, source in {
                "add": scripts.ADD_VERSION,
                "activate": scripts.ACTIVATE,
                "delete": scripts.DELETE_TASK,
                "restore": scripts.RESTORE_TASK,
            }.items()
        }
        self._skip_until = 0.0  # monotonic time before which Redis is not tried (after a connection failure)

    # Keys

    def _keys(self, tenant: str, task_id: str) -> list[str]:
        if not is_valid_task_id(tenant) or not is_valid_task_id(task_id):
            raise TaskNotFound(task_id)
        ns = self.namespace
        return [
            f"{ns}:task:{tenant}:{task_id}",
            f"{ns}:prompts:{tenant}:{task_id}",
            f"{ns}:tasks:{tenant}",
            f"{ns}:tenants",
            self._marker,
        ]

    # Availability

    @property
    def available(self) -> bool:
        """False for `retry_interval_s` after a connection failure (reads go to the mirror meanwhile)."""
        return time.monotonic() >= self._skip_until

    def mark_available(self) -> None:
        """Called when a connection succeeded elsewhere (the change listener), to stop skipping Redis."""
        self._skip_until = 0.0

    def _call(self, operation: Callable[[], T]) -> T:
        """Runs one Redis operation, turning connection trouble into `StoreUnavailable`."""
        if not self.available:
            raise StoreUnavailable(UNAVAILABLE)
        try:
            return operation()
        except (redis.ConnectionError, redis.TimeoutError) as error:
            self._skip_until = time.monotonic() + self.retry_interval_s
            raise StoreUnavailable(UNAVAILABLE) from error
        except (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError) as error:
            raise StoreUnavailable(f"the prompt registry's Redis refuses writes: {error}") from error

    def ping(self) -> bool:
        try:
            return bool(self._call(self.client.ping))
        except StoreUnavailable:
            return False

    def _fallback(self, read: Callable[[], T], mirrored: Callable[[DiskStore], T]) -> tuple[T, LoadSource]:
        try:
            return self._call(read), "redis"
        except StoreUnavailable:
            if self.mirror is None:
                raise
            return mirrored(self.mirror), "disk"

    # Reads (fall back to the mirror while Redis is unreachable)

    def get_task(self, tenant: str, task_id: str) -> TaskRecord:
        return self._fallback(lambda: self._read_task(tenant, task_id), lambda m: m.get_task(tenant, task_id))[0]

    def _read_task(self, tenant: str, task_id: str) -> TaskRecord:
        raw = self.client.hgetall(self._keys(tenant, task_id)[0])
        if not raw:
            self._check_populated()
            raise TaskNotFound(task_id)
        return record_from_fields(tenant, task_id, raw)

    def _check_populated(self, populated: bool | None = None) -> None:
        """A Redis that lost its data, or is being rebuilt, cannot say a task does not exist: the mirror can."""
        if self.mirror is None:
            return
        if not (populated if populated is not None else self.client.exists(self._marker)):
            raise StoreUnavailable("the prompt registry's Redis is being rebuilt from its disk mirror")

    def list_tasks(self, tenant: str) -> list[TaskRecord]:
        if not is_valid_task_id(tenant):
            return []
        return self._fallback(lambda: self._read_tasks(tenant), lambda m: m.list_tasks(tenant))[0]

    def _read_tasks(self, tenant: str) -> list[TaskRecord]:
        task_ids = sorted(member.decode() for member in self.client.smembers(f"{self.namespace}:tasks:{tenant}"))
        pipe = self.client.pipeline(transaction=False)
        pipe.exists(self._marker)
        for task_id in task_ids:
            pipe.hgetall(self._keys(tenant, task_id)[0])
        populated, *raws = pipe.execute()
        self._check_populated(bool(populated))
        return [record_from_fields(tenant, t, raw) for t, raw in zip(task_ids, raws, strict=True) if raw]

    def list_tenants(self) -> list[str]:
        return self._fallback(
            lambda: sorted(m.decode() for m in self.client.smembers(f"{self.namespace}:tenants")),
            lambda m: m.list_tenants(),
        )[0]

    def load_prompt(self, tenant: str, task_id: str, version: int) -> SoftPrompt:
        return self.load_prompt_traced(tenant, task_id, version)[0]

    def load_prompt_traced(self, tenant: str, task_id: str, version: int) -> tuple[SoftPrompt, LoadSource]:
        """The prompt and where it came from: Redis, or the disk mirror while Redis is unreachable."""
        return self._fallback(
            lambda: self._read_prompt(tenant, task_id, version), lambda m: m.load_prompt(tenant, task_id, version)
        )

    def _read_prompt(self, tenant: str, task_id: str, version: int) -> SoftPrompt:
        task_key, prompts_key, *_ = self._keys(tenant, task_id)
        data = self.client.hget(prompts_key, str(version))
        if data is None:
            if not self.client.exists(task_key):
                self._check_populated()
                raise TaskNotFound(task_id)
            raise VersionNotFound(task_id, version)
        return prompt_from_bytes(data)

    def task_stamps(self, tasks: list[TaskKey]) -> list[float | None]:
        """Each task's `updated_at` in Redis (None: gone), pipelined; raises `StoreUnavailable` (no fallback)."""
        stamps: list[float | None] = []
        for start in range(0, len(tasks), STAMP_CHUNK):
            pipe = self.client.pipeline(transaction=False)
            pipe.exists(self._marker)
            for tenant, task_id in tasks[start : start + STAMP_CHUNK]:
                pipe.hget(self._keys(tenant, task_id)[0], "updated_at")
            populated, *values = self._call(pipe.execute)
            self._check_populated(bool(populated))
            stamps.extend(float(v) if v is not None else None for v in values)
        return stamps

    # Writes (Redis first, atomically; then the mirror)

    def _run_script(self, name: str, tenant: str, task_id: str, args: list[Any]) -> Any:
        keys = self._keys(tenant, task_id)
        argv = [self.channel, tenant, task_id, repr(time.time()), *args]
        for attempt in range(2):
            try:
                return self._call(lambda: self._scripts[name](keys=keys, args=argv))
            except redis.ResponseError as error:
                message = str(error)
                if message.startswith(scripts.NO_TASK):
                    raise TaskNotFound(task_id) from None
                if message.startswith(scripts.NO_VERSION):
                    raise VersionNotFound(task_id, int(args[0])) from None
                if not message.startswith(scripts.UNPOPULATED) or attempt:
                    raise StoreUnavailable(f"the prompt registry's Redis refused the change: {message}") from error
                self.ensure_populated()  # Redis lost its data: rebuild from the mirror, then try once more
        raise AssertionError("unreachable")

    def add_version(
        self,
        tenant: str,
        task_id: str,
        prompt: SoftPrompt,
        metadata: TaskMetadata | None = None,
        activate: bool = True,
        model: str = "",
    ) -> TaskRecord:
        info = VersionInfo(version=0, length=prompt.length, d_model=prompt.d_model, sha256=prompt.sha256, model=model)
        meta = [item for pair in metadata_fields(metadata).items() for item in pair]
        args = [prompt_bytes(prompt), info.model_dump_json(exclude={"version"}), "1" if activate else "0", *meta]
        fields = _pairs(self._run_script("add", tenant, task_id, args))
        record = record_from_fields(tenant, task_id, fields)
        # The script returns the hash as its own write left it, so `last_version` is the version it made.
        self._mirror(tenant, task_id, record, {int(fields[b"last_version"]): prompt})
        return record

    def activate(self, tenant: str, task_id: str, version: int) -> TaskRecord:
        raw = self._run_script("activate", tenant, task_id, [str(version)])
        record = record_from_fields(tenant, task_id, _pairs(raw))
        self._mirror(tenant, task_id, record)
        return record

    def delete_task(self, tenant: str, task_id: str) -> None:
        self._run_script("delete", tenant, task_id, [])
        self._mirror(tenant, task_id, None)

    # The disk mirror

    def _mirror(
        self, tenant: str, task_id: str, committed: TaskRecord | None, written: dict[int, SoftPrompt] | None = None
    ) -> None:
        """Copies the task's current Redis state to the mirror (what was just `committed` if Redis is gone)."""
        mirror = self.mirror
        if mirror is None:
            return
        with _file_lock(mirror.root / ".locks" / tenant / f"{task_id}.lock"):
            for version, prompt in (written or {}).items():
                mirror.write_prompt(tenant, task_id, version, prompt)
            try:
                current: TaskRecord | None = self._call(lambda: self._read_task(tenant, task_id))
            except TaskNotFound:
                current = None
            except StoreUnavailable:
                current = committed
            if current is None:
                with suppress(TaskNotFound):
                    mirror.delete_task(tenant, task_id)
                return
            self._mirror_missing_versions(mirror, current, set(written or {}))
            mirror.put_record(current)

    def _mirror_missing_versions(self, mirror: DiskStore, record: TaskRecord, written: set[int]) -> None:
        """Versions another writer added whose files the mirror lacks (e.g. its own mirror write failed)."""
        try:
            on_disk = {v.version for v in mirror.get_task(record.tenant, record.task_id).versions}
        except TaskNotFound:
            on_disk = set()
        for info in record.versions:
            if info.version in on_disk or info.version in written:
                continue
            try:
                prompt = self._call(lambda v=info.version: self._read_prompt(record.tenant, record.task_id, v))
            except (StoreUnavailable, VersionNotFound, TaskNotFound):
                continue
            mirror.write_prompt(record.tenant, record.task_id, info.version, prompt)

    # Rebuild from the mirror

    def ensure_populated(self) -> int:
        """If Redis has lost the registry (no marker), rebuilds it from the mirror; returns tasks restored.

        One replica rebuilds (a lock key); the others' writes answer 503 until the marker is set.
        """
        marker = self._marker
        if self._call(lambda: self.client.exists(marker)):
            return 0
        lock, token = f"{self.namespace}:rebuild-lock", uuid.uuid4().hex
        if not self._call(lambda: self.client.set(lock, token, nx=True, px=REBUILD_LOCK_MS)):
            return 0
        try:
            restored = self.rebuild_from_mirror()
            self._call(lambda: self.client.set(marker, repr(time.time())))
            log.info("rebuilt the Redis prompt registry from the disk mirror: %d task(s) restored", restored)
            return restored
        finally:
            self._call(lambda: self.client.delete(lock) if self.client.get(lock) == token.encode() else 0)

    def rebuild_from_mirror(self) -> int:
        """Copies every mirrored task that Redis lacks into Redis (tasks Redis has are left alone)."""
        if self.mirror is None:
            return 0
        restored = 0
        for tenant in self.mirror.list_tenants():
            for record in self.mirror.list_tasks(tenant):
                restored += self._restore(self.mirror, record)
        return restored

    def _restore(self, mirror: DiskStore, record: TaskRecord) -> int:
        fields = record_fields(record)
        blobs: list[str | bytes] = []
        for info in record.versions:
            try:
                prompt = mirror.load_prompt(record.tenant, record.task_id, info.version)
            except VersionNotFound:
                log.warning("mirror of %s/%s lacks version %d", record.tenant, record.task_id, info.version)
                continue
            blobs += [str(info.version), prompt_bytes(prompt)]
        args = [len(fields), *(item for pair in fields.items() for item in pair), *blobs]
        return int(self._run_script("restore", record.tenant, record.task_id, args))

    def close(self) -> None:
        self.client.close()


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    """HGETALL as a Lua script returns it (a flat list) to the dict redis-py returns."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock shared by every process (and thread) writing this mirror directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
