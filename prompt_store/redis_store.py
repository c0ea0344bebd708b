"""Redis backend: tenant-namespaced keys, atomic scripted writes, change notices, and a disk mirror.

Layout (every name under `namespace`, default `softserve`; tenant and task ids cannot hold `:` or `/`):
- `{ns}:task:{tenant}:{task}`    hash: created_at, updated_at, active_version, last_version,
                                 `meta:<field>` (JSON), `version:<n>` (VersionInfo JSON without the version),
                                 `ensemble` (JSON list of versions; absent: none)
- `{ns}:prompts:{tenant}:{task}` hash: version -> the prompt as safetensors bytes (binary-safe)
- `{ns}:tasks:{tenant}`          set of the tenant's task ids; `{ns}:tenants` set of tenants
- `{ns}:task-index:{tenant}`     the same ids as a sorted set (score 0: byte order), which listings page through;
                                 rebuilt from the set when their sizes differ (data written before it existed)
- `{ns}:populated`               marker: this Redis holds the registry (set after a rebuild from the mirror);
                                 a sorted set: its epoch and the index of changes (see `redis_scripts`)
- `{ns}:staged:{id}`             a prompt's bytes on their way into a write script (expire by themselves)
- `{ns}:changes`                 channel: one JSON notice per change (version, activate, ensemble, delete,
                                 restore)

Each write is one Lua script (atomic; versions come from HINCRBY inside it, so replicas never race for a
number) that publishes its notice on commit, and that changes nothing if Redis runs it after its deadline:
an answer of 503 is the truth, the change never takes effect later (see `redis_scripts`).

The disk mirror equals Redis. Each change is written through to it under a per-task file lock, copying
the task as Redis has it at that moment, so concurrent writers from several replicas sharing one mirror
directory leave it equal to Redis. What a write-through misses (its writer crashed, its mirror is another
replica's volume, the disk was full) `sync_mirror` repairs: it copies every task changed since the mirror
last synced (the marker's change index), deletes included, or compares everything after Redis was
(re)populated. Redis is rebuilt from the mirror only when the marker is missing (Redis lost its data); an
empty registry keeps its marker, so tasks deleted from both are never resurrected.

Redis down: reads fall back to the mirror; writes raise `StoreUnavailable` (HTTP 503); so does a version
the mirror lacks (it may exist in Redis). After a connection failure Redis is skipped for
`retry_interval_s`, so requests do not each wait on a dead socket.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, NamedTuple, TypeVar
from urllib.parse import quote

import redis
import safetensors.torch

import prompt_store.redis_scripts as scripts
from prompt_store.atomic import write_atomically
from prompt_store.disk import DiskStore
from prompt_store.errors import PromptStoreError, StoreUnavailable, TaskNotFound, VersionNotFound
from prompt_store.formats import PROMPT_KEY
from prompt_store.prompt import SoftPrompt
from prompt_store.records import TaskMetadata, TaskRecord, VersionInfo, is_valid_task_id
from prompt_store.redis_clients import connect
from prompt_store.store import LoadSource

log = logging.getLogger(__name__)

T = TypeVar("T")
TaskKey = tuple[str, str]

UNAVAILABLE = "the prompt registry's Redis is unavailable; prompt changes are refused until it is back"
TOO_LATE = "the prompt registry's Redis did not answer in time; the change was not made"
REBUILDING = "the prompt registry's Redis is being rebuilt from its disk mirror"
REBUILD_LOCK_MS = 10 * 60 * 1000
STAGED_TTL_MS = 2 * 60 * 1000
STAMP_CHUNK = 1000


class EpochChanged(Exception):
    """Redis lost its data or was repopulated while the mirror was being synced with it."""


class ChangeHead(NamedTuple):
    """Where the marker's change index stands: the epoch, the last change, and up to where deletes were pruned."""

    epoch: str
    generation: int
    pruned: int


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
    if record.ensemble:
        fields["ensemble"] = json.dumps(record.ensemble)
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
        ensemble=json.loads(fields.get("ensemble", "[]")),
        created_at=float(fields["created_at"]),
        updated_at=float(fields["updated_at"]),
    )


class RedisStore:
    """A `PromptStore` on Redis, written through to a `DiskStore` mirror (or Redis alone: `mirror=None`)."""

    primary: LoadSource = "redis"

    def __init__(
        self,
        url: str,
        mirror: DiskStore | None = None,
        namespace: str = "softserve",
        timeout_s: float = 1.0,
        retry_interval_s: float = 1.0,
    ) -> None:
        self.mirror = mirror
        self.namespace = namespace
        self.channel = f"{namespace}:changes"
        self._marker = f"{namespace}:populated"
        self.timeout_s = timeout_s
        self.retry_interval_s = retry_interval_s
        self.client = connect(url, timeout_s)
        # Write scripts: never sent twice, and their reply is awaited a whole timeout past their deadline,
        # so a script Redis ran in time is answered (see `redis_scripts`).
        self._writer = connect(url, timeout_s, retries=0, reply_wait_s=2 * timeout_s)
        self._scripts = {
            name: self.client.register_script(source)
            for name, source in {
                "add": scripts.ADD_VERSION,
                "activate": scripts.ACTIVATE,
                "ensemble": scripts.SET_ENSEMBLE,
                "delete": scripts.DELETE_TASK,
                "restore": scripts.RESTORE_TASK,
                "upgrade_marker": scripts.UPGRADE_MARKER,
                "index_tasks": scripts.INDEX_TASKS,
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
            f"{ns}:task-index:{tenant}",
        ]

    # Availability

    @property
    def available(self) -> bool:
        """False for `retry_interval_s` after a connection failure (reads go to the mirror meanwhile)."""
        return time.monotonic() >= self._skip_until

    def mark_available(self) -> None:
        """Called when a connection succeeded elsewhere (the change listener), to stop skipping Redis."""
        self._skip_until = 0.0

    def mark_unavailable(self) -> None:
        """Called when Redis stopped answering elsewhere (the change listener's heartbeat): Redis is skipped
        until `mark_available`, so no request waits on it and no write is sent to it meanwhile."""
        self._skip_until = math.inf

    def _call(self, operation: Callable[[], T]) -> T:
        """Runs one Redis operation, turning connection trouble into `StoreUnavailable`."""
        if not self.available:
            raise StoreUnavailable(UNAVAILABLE)
        try:
            return operation()
        except (redis.ConnectionError, redis.TimeoutError) as error:
            self._skip_until = max(self._skip_until, time.monotonic() + self.retry_interval_s)
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
        return self.get_task_traced(tenant, task_id)[0]

    def get_task_traced(self, tenant: str, task_id: str) -> tuple[TaskRecord, LoadSource]:
        """The record and where it came from: Redis, or the disk mirror while Redis is unreachable."""
        return self._fallback(lambda: self._read_task(tenant, task_id), lambda m: m.get_task(tenant, task_id))

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
            raise StoreUnavailable(REBUILDING)

    def list_tasks(self, tenant: str) -> list[TaskRecord]:
        return self.get_tasks(tenant, self.task_ids(tenant))

    def task_ids(self, tenant: str, after: str | None = None, limit: int | None = None) -> list[str]:
        if not is_valid_task_id(tenant):
            return []
        return self._fallback(
            lambda: self._read_task_ids(tenant, after, limit), lambda m: m.task_ids(tenant, after, limit)
        )[0]

    def _read_task_ids(self, tenant: str, after: str | None, limit: int | None) -> list[str]:
        task_set, index = f"{self.namespace}:tasks:{tenant}", f"{self.namespace}:task-index:{tenant}"
        pipe = self.client.pipeline(transaction=False)
        pipe.exists(self._marker)
        pipe.scard(task_set)
        pipe.zcard(index)
        _range_by_id(pipe, index, after, limit)
        populated, listed, indexed, members = pipe.execute()
        self._check_populated(bool(populated))
        if listed != indexed:  # tasks written before the index existed, or by a replica that predates it
            self._scripts["index_tasks"](keys=[task_set, index])
            members = _range_by_id(self.client, index, after, limit)
        return [member.decode() for member in members]

    def get_tasks(self, tenant: str, task_ids: Sequence[str]) -> list[TaskRecord]:
        if not is_valid_task_id(tenant):
            return []
        return self._fallback(lambda: self._read_records(tenant, task_ids), lambda m: m.get_tasks(tenant, task_ids))[0]

    def _read_records(self, tenant: str, task_ids: Sequence[str]) -> list[TaskRecord]:
        valid = [task_id for task_id in task_ids if is_valid_task_id(task_id)]
        pipe = self.client.pipeline(transaction=False)
        pipe.exists(self._marker)
        for task_id in valid:
            pipe.hgetall(self._keys(tenant, task_id)[0])
        populated, *raws = pipe.execute()
        self._check_populated(bool(populated))
        return [record_from_fields(tenant, t, raw) for t, raw in zip(valid, raws, strict=True) if raw]

    def count_tasks(self, tenant: str) -> int:
        if not is_valid_task_id(tenant):
            return 0
        return self._fallback(
            lambda: int(self.client.scard(f"{self.namespace}:tasks:{tenant}")), lambda m: m.count_tasks(tenant)
        )[0]

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
            lambda: self._read_prompt(tenant, task_id, version),
            lambda m: _mirrored_prompt(m, tenant, task_id, version),
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

    def _run_script(self, name: str, tenant: str, task_id: str, args: list[Any], staged: Sequence[bytes] = ()) -> Any:
        keys = self._keys(tenant, task_id)
        for attempt in range(2):
            try:
                return self._send_script(name, keys, [self.channel, tenant, task_id], args, staged)
            except redis.ResponseError as error:
                refusal = _refusal(error, task_id, args)
                if refusal is not None or attempt:
                    raise (refusal or StoreUnavailable(REBUILDING)) from None
                self.ensure_populated()  # Redis lost its data: rebuild from the mirror, then try once more
        raise AssertionError("unreachable")

    def _send_script(
        self, name: str, keys: list[str], head: list[str], args: list[Any], staged: Sequence[bytes]
    ) -> Any:
        """Stages the bytes, reads the deadline, and sends the script once, on the write connection."""
        staged_keys, deadline = self._stage(staged)
        argv = [*head, deadline, *args]
        return self._call(lambda: self._scripts[name](keys=[*keys, *staged_keys], args=argv, client=self._writer))

    def _stage(self, blobs: Sequence[bytes]) -> tuple[list[str], int]:
        """Stores the bytes a script will use under keys that expire, and reads Redis' clock after them:
        returns the keys and the script's deadline (microseconds). Nothing here changes the registry."""
        keys = [f"{self.namespace}:staged:{uuid.uuid4().hex}" for _ in blobs]
        pipe = self.client.pipeline(transaction=False)
        for key, blob in zip(keys, blobs, strict=True):
            pipe.set(key, blob, px=STAGED_TTL_MS)
        pipe.time()
        *_, (seconds, micros) = self._call(pipe.execute)
        return keys, seconds * 1_000_000 + micros + round(self.timeout_s * 1_000_000)

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
        args = [info.model_dump_json(exclude={"version"}), "1" if activate else "0", *meta]
        fields = _pairs(self._run_script("add", tenant, task_id, args, staged=[prompt_bytes(prompt)]))
        record = record_from_fields(tenant, task_id, fields)
        # The script returns the hash as its own write left it, so `last_version` is the version it made.
        self._write_through(tenant, task_id, record, record.updated_at, {int(fields[b"last_version"]): prompt})
        return record

    def activate(self, tenant: str, task_id: str, version: int) -> TaskRecord:
        raw = self._run_script("activate", tenant, task_id, [str(version)])
        record = record_from_fields(tenant, task_id, _pairs(raw))
        self._write_through(tenant, task_id, record, record.updated_at)
        return record

    def set_ensemble(self, tenant: str, task_id: str, versions: list[int]) -> TaskRecord:
        raw = self._run_script("ensemble", tenant, task_id, [json.dumps(versions), *map(str, versions)])
        record = record_from_fields(tenant, task_id, _pairs(raw))
        self._write_through(tenant, task_id, record, record.updated_at)
        return record

    def delete_task(self, tenant: str, task_id: str) -> None:
        stamp = float(self._run_script("delete", tenant, task_id, []))
        self._write_through(tenant, task_id, None, stamp)

    # The disk mirror

    def _write_through(
        self,
        tenant: str,
        task_id: str,
        committed: TaskRecord | None,
        stamp: float,
        written: dict[int, SoftPrompt] | None = None,
    ) -> None:
        """Copies a committed change to the mirror: the task as Redis has it now (other writers may have
        changed it since), or if Redis cannot say, what was `committed` at `stamp` unless the mirror is newer.

        A mirror that cannot be written is logged, not raised: the change is made, and `sync_mirror` repairs it.
        """
        mirror = self.mirror
        if mirror is None:
            return
        prompts = written or {}
        try:
            with self._task_lock(mirror, tenant, task_id):
                try:
                    current = self._current_task(tenant, task_id)
                except StoreUnavailable:
                    if not _mirror_older_than(mirror, tenant, task_id, stamp):
                        return
                    current = committed
                mirror.mirror_task(
                    tenant,
                    task_id,
                    current,
                    lambda v: prompts[v] if v in prompts else self._prompt_if_reachable(tenant, task_id, v),
                )
        except OSError:
            log.exception("could not write %s/%s to the disk mirror; reconciliation repairs it", tenant, task_id)

    def _current_task(self, tenant: str, task_id: str, epoch: str | None = None) -> TaskRecord | None:
        """The task as Redis has it (None: no such task), read with the marker in one transaction: raises
        `StoreUnavailable` if Redis lost its data, `EpochChanged` if it is not populated as of `epoch`."""
        pipe = self.client.pipeline(transaction=True)
        pipe.zrangebyscore(self._marker, 0, 0)
        pipe.hgetall(self._keys(tenant, task_id)[0])
        head, raw = self._call(pipe.execute)
        seen = _marked(head, "epoch:")
        if seen is None:
            raise StoreUnavailable(REBUILDING)  # an empty Redis says nothing about what exists
        if epoch is not None and seen != epoch:
            raise EpochChanged()
        return record_from_fields(tenant, task_id, raw) if raw else None

    def _existing_prompt(self, tenant: str, task_id: str, version: int) -> SoftPrompt | None:
        """A version's prompt from Redis; None when it is gone meanwhile (that change is copied in its turn)."""
        try:
            return self._call(lambda: self._read_prompt(tenant, task_id, version))
        except (TaskNotFound, VersionNotFound):
            return None

    def _prompt_if_reachable(self, tenant: str, task_id: str, version: int) -> SoftPrompt | None:
        try:
            return self._existing_prompt(tenant, task_id, version)
        except StoreUnavailable:
            return None

    def _task_lock(self, mirror: DiskStore, tenant: str, task_id: str) -> AbstractContextManager[None]:
        """Serializes every copy of one task into the mirror, across threads, processes and replicas."""
        return _file_lock(mirror.root / ".locks" / tenant / f"{task_id}.lock")

    def sync_mirror(self) -> int:
        """Makes the disk mirror equal Redis; returns how many tasks it changed in the mirror.

        Copies the tasks changed or deleted since the mirror last synced (one round trip when nothing
        changed), or compares every task in either when that is not enough: Redis was (re)populated since,
        went back in time (a crash lost its last writes), or dropped deletes older than that.
        Raises `StoreUnavailable` when Redis cannot be read or lost its data (it is rebuilt first).
        """
        mirror = self.mirror
        if mirror is None:
            return 0
        synced = self._synced_as_of(mirror)
        head = self._change_head()
        if synced == (head.epoch, head.generation):
            return 0
        every = synced is None or synced[0] != head.epoch or not head.pruned <= synced[1] <= head.generation
        tasks = self._every_task(mirror) if every else self._tasks_changed_since(synced[1])
        try:
            changed = sum(self._sync_task(mirror, tenant, task_id, head.epoch) for tenant, task_id in sorted(tasks))
        except EpochChanged:
            log.info("Redis was repopulated during a mirror sync; the next one compares every task")
            return 0
        state = {"epoch": head.epoch, "generation": head.generation}
        write_atomically(self._sync_state_path(mirror), json.dumps(state).encode())
        if changed:
            log.info("disk mirror sync (%s): %d task(s) repaired", "every task" if every else "changes", changed)
        return changed

    def _sync_task(self, mirror: DiskStore, tenant: str, task_id: str, epoch: str) -> bool:
        if not (is_valid_task_id(tenant) and is_valid_task_id(task_id)):
            return False
        with self._task_lock(mirror, tenant, task_id):
            current = self._current_task(tenant, task_id, epoch)
            return mirror.mirror_task(tenant, task_id, current, lambda v: self._existing_prompt(tenant, task_id, v))

    def _change_head(self) -> ChangeHead:
        """Where the marker's change index stands; raises `StoreUnavailable` while Redis is not populated."""
        pipe = self.client.pipeline(transaction=True)
        pipe.zrangebyscore(self._marker, 0, 0)
        pipe.zrange(self._marker, -1, -1, withscores=True)
        pipe.zrange(self._marker, 0, 0, withscores=True)
        head, top, bottom = self._call(pipe.execute)
        epoch = _marked(head, "epoch:")
        if epoch is None:
            raise StoreUnavailable(REBUILDING)
        generation = max(int(top[0][1]), -int(bottom[0][1]))
        return ChangeHead(epoch, generation, int(_marked(head, "pruned:") or 0))

    def _tasks_changed_since(self, generation: int) -> set[TaskKey]:
        pipe = self.client.pipeline(transaction=True)
        pipe.zrangebyscore(self._marker, f"({generation}", "+inf")
        pipe.zrangebyscore(self._marker, "-inf", f"({-generation}")
        changed, deleted = self._call(pipe.execute)
        return {_task_key(member) for member in [*changed, *deleted]}

    def _every_task(self, mirror: DiskStore) -> set[TaskKey]:
        """Every task Redis has or the mirror has."""
        ns = self.namespace
        tenants = sorted(m.decode() for m in self._call(lambda: self.client.smembers(f"{ns}:tenants")))
        pipe = self.client.pipeline(transaction=False)
        for tenant in tenants:
            pipe.smembers(f"{ns}:tasks:{tenant}")
        members = self._call(pipe.execute) if tenants else []
        tasks = {(t, m.decode()) for t, ms in zip(tenants, members, strict=True) for m in ms}
        return tasks | {(t, r.task_id) for t in mirror.list_tenants() for r in mirror.list_tasks(t)}

    def _synced_as_of(self, mirror: DiskStore) -> tuple[str, int] | None:
        """(epoch, generation) of Redis when the mirror was last synced with it; None if never (or unreadable)."""
        try:
            state = json.loads(self._sync_state_path(mirror).read_bytes())
            return str(state["epoch"]), int(state["generation"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _sync_state_path(self, mirror: DiskStore) -> Path:
        return mirror.root / f".redis-sync-{quote(self.namespace, safe='')}.json"

    # Rebuild from the mirror

    def ensure_populated(self) -> int:
        """If Redis has lost the registry (no marker), rebuilds it from the mirror; returns tasks restored.

        One replica rebuilds (a lock key); the others' writes answer 503 until the marker is set. The marker
        gets a new epoch, so every mirror then compares all its tasks with Redis.
        """
        marker = self._marker
        kind = self._call(lambda: self.client.type(marker))
        if kind == b"string":  # written before the marker held the change index
            self._call(lambda: self._scripts["upgrade_marker"](keys=[marker]))
        if kind != b"none":
            return 0
        lock, token = f"{self.namespace}:rebuild-lock", uuid.uuid4().hex
        if not self._call(lambda: self.client.set(lock, token, nx=True, px=REBUILD_LOCK_MS)):
            return 0
        try:
            restored = self.rebuild_from_mirror()
            self._call(lambda: self.client.zadd(marker, {f"epoch:{uuid.uuid4().hex}": 0}))
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
        versions: list[str] = []
        blobs: list[bytes] = []
        for info in record.versions:
            try:
                prompt = mirror.load_prompt(record.tenant, record.task_id, info.version)
            except VersionNotFound:
                log.warning("mirror of %s/%s lacks version %d", record.tenant, record.task_id, info.version)
                continue
            versions.append(str(info.version))
            blobs.append(prompt_bytes(prompt))
        args = [len(fields), *(item for pair in fields.items() for item in pair), *versions]
        return int(self._run_script("restore", record.tenant, record.task_id, args, staged=blobs))

    def close(self) -> None:
        self.client.close()
        self._writer.close()


def _refusal(error: redis.ResponseError, task_id: str, args: list[Any]) -> PromptStoreError | None:
    """What a script's error reply means for the caller; None for "not populated" (rebuild, then retry)."""
    message = str(error)
    if message.startswith(scripts.UNPOPULATED):
        return None
    if message.startswith(scripts.NO_TASK):
        return TaskNotFound(task_id)
    if message.startswith(scripts.NO_VERSION):
        named = message.split()[1:2]  # a script checking several versions names the missing one
        return VersionNotFound(task_id, int(named[0]) if named else int(args[0]))
    if message.startswith(scripts.LATE):
        return StoreUnavailable(TOO_LATE)
    return StoreUnavailable(f"the prompt registry's Redis refused the change: {message}")


def unknown_version(task_id: str, version: int) -> StoreUnavailable:
    """What a version the mirror lacks means while Redis is unreachable: it may well exist in Redis."""
    return StoreUnavailable(
        f"the prompt registry's Redis is unavailable and its disk mirror has no version {version} of "
        f"task '{task_id}', so whether that version exists cannot be told until Redis is back"
    )


def _mirrored_prompt(mirror: DiskStore, tenant: str, task_id: str, version: int) -> SoftPrompt:
    try:
        return mirror.load_prompt(tenant, task_id, version)
    except VersionNotFound:
        raise unknown_version(task_id, version) from None


def _mirror_older_than(mirror: DiskStore, tenant: str, task_id: str, stamp: float) -> bool:
    try:
        return mirror.get_task(tenant, task_id).updated_at < stamp
    except TaskNotFound:
        return True


def _marked(members: list[bytes], prefix: str) -> str | None:
    """The value of the marker member named `<prefix><value>` (its epoch, or how far deletes were pruned)."""
    return next((m.decode().removeprefix(prefix) for m in members if m.decode().startswith(prefix)), None)


def _task_key(member: bytes) -> TaskKey:
    """(tenant, task) of a `task:<tenant>/<task>` or `deleted:<tenant>/<task>` index member."""
    tenant, _, task_id = member.decode().partition(":")[2].partition("/")
    return tenant, task_id


def _range_by_id(client: Any, index: str, after: str | None, limit: int | None) -> Any:
    """ZRANGEBYLEX of a task index: the ids after `after` (all: None), at most `limit` (all: None)."""
    start = f"({after}" if after is not None else "-"
    window = {"start": 0, "num": limit} if limit is not None else {}
    return client.zrangebylex(index, start, "+", **window)


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
