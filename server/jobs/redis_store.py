"""`RedisJobStore`: job records shared by API replicas and `softserve worker` processes.

Keys (under `namespace`; tenant names cannot hold `:`):
- `{ns}:job:{id}` the record (JSON); `{ns}:job:{id}:dataset` the train/eval sets until the job ends;
  `{ns}:job:{id}:checkpoint` the last checkpoint (bytes) while it runs;
  `{ns}:job:{id}:lease` who runs it, with a TTL its worker keeps renewing (see `server.jobs.lease`).
- `{ns}:jobs:{tenant}` sorted set of the tenant's job ids by creation time;
  `{ns}:jobs:active` and `{ns}:jobs:active:{tenant}` sets of unfinished job ids.
- `{ns}:training:turns` hash tenant -> the value of the counter `{ns}:training:turn` when a worker last
  took one of the tenant's jobs (the fair order, `server.jobs.fairness`).
- `{ns}:quarantine:job:{id}` a record that did not read back, renamed aside (and logged): one bad record
  must never fail a listing, a tenant's submissions or the reaper. Ids it leaves in the sets are skipped
  (a listing) or dropped (the active-job quota counts only records that exist).

Every change is an optimistic transaction (WATCH the record, MULTI/EXEC), so a cancel from an API replica
and a worker's progress never overwrite each other: one of them retries on the other's result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar, Union, cast

import redis
from redis.client import Pipeline

from server.jobs.dataset import Dataset
from server.jobs.errors import JobNotFound, JobStoreUnavailable
from server.jobs.records import JobRecord
from server.jobs.store import Change, too_many

log = logging.getLogger(__name__)

T = TypeVar("T")

# Marks the tenant's turn with the next value of a shared counter (no clocks: workers' clocks may differ).
TAKE_TURN = "return redis.call('HSET', KEYS[1], ARGV[1], redis.call('INCR', KEYS[2]))"


class RedisJobStore:
    def __init__(self, client: redis.Redis, namespace: str = "softserve") -> None:
        self.client = client
        self.ns = namespace
        self._take_turn = client.register_script(TAKE_TURN)

    # Keys

    def _job(self, job_id: str, part: str = "") -> str:
        if ":" in job_id:
            raise JobNotFound(job_id)
        return f"{self.ns}:job:{job_id}" + (f":{part}" if part else "")

    def _tenant_jobs(self, tenant: str) -> str:
        return f"{self.ns}:jobs:{tenant}"

    def _active(self, tenant: str | None = None) -> str:
        return f"{self.ns}:jobs:active" + (f":{tenant}" if tenant else "")

    def _call(self, operation: Callable[[], T]) -> T:
        try:
            return operation()
        except (redis.ConnectionError, redis.TimeoutError) as error:
            raise JobStoreUnavailable(f"the training job store (Redis) is unavailable: {error}") from error

    # Records

    def _parse(self, job_id: str, raw: bytes) -> JobRecord | None:
        """The record, or None when it does not validate (it is then quarantined)."""
        try:
            return JobRecord.model_validate_json(raw)
        except ValueError as error:  # a pydantic ValidationError is a ValueError
            self._quarantine(job_id, raw, error)
            return None

    def _quarantine(self, job_id: str, raw: bytes, error: Exception) -> None:
        key, aside = self._job(job_id), f"{self.ns}:quarantine:job:{job_id}"

        def move(pipe: Pipeline) -> bool:
            if pipe.get(key) != raw:  # rewritten (or moved) since it was read: not ours to move
                return False
            pipe.multi()
            pipe.rename(key, aside)
            pipe.srem(self._active(), job_id)
            return True

        if self._call(lambda: self.client.transaction(move, key, value_from_callable=True)):
            log.error("job %s: its record is unreadable and was moved to %s: %s", job_id, aside, error)

    def _dangling(self, pipe: Pipeline, job_ids: set[bytes]) -> list[bytes]:
        """Ids whose record is gone (quarantined): they must not count against a tenant's quota."""
        return [i for i in job_ids if not pipe.exists(self._job(i.decode()))]

    def create(self, record: JobRecord, dataset: Dataset, max_active: int = 0) -> None:
        tenant_active = self._active(record.tenant)

        def write(pipe: Pipeline) -> None:
            dangling: list[bytes] = []
            if max_active and pipe.scard(tenant_active) >= max_active:
                members = pipe.smembers(tenant_active)
                dangling = self._dangling(pipe, members)
                if len(members) - len(dangling) >= max_active:
                    raise too_many(record.tenant, max_active)
            pipe.multi()
            if dangling:
                pipe.srem(tenant_active, *dangling)
            pipe.set(self._job(record.job_id, "dataset"), dataset.to_json())
            pipe.set(self._job(record.job_id), record.model_dump_json())
            pipe.zadd(self._tenant_jobs(record.tenant), {record.job_id: record.created_at})
            pipe.sadd(self._active(), record.job_id)
            pipe.sadd(tenant_active, record.job_id)

        self._call(lambda: self.client.transaction(write, tenant_active))

    def get(self, job_id: str) -> JobRecord:
        raw = self._call(lambda: self.client.get(self._job(job_id)))
        record = self._parse(job_id, raw) if raw is not None else None
        if record is None:
            raise JobNotFound(job_id)
        return record

    def _many(self, job_ids: list[Any]) -> list[JobRecord]:
        if not job_ids:
            return []
        ids = [i.decode() if isinstance(i, bytes) else i for i in job_ids]
        raws = self._call(lambda: self.client.mget([self._job(i) for i in ids]))
        found = (self._parse(job_id, raw) for job_id, raw in zip(ids, raws, strict=True) if raw is not None)
        return [record for record in found if record is not None]

    def tenant_jobs(self, tenant: str) -> list[JobRecord]:
        return self._many(self._call(lambda: self.client.zrevrange(self._tenant_jobs(tenant), 0, -1)))

    def active(self) -> list[JobRecord]:
        records = self._many(list(self._call(lambda: self.client.smembers(self._active()))))
        return sorted((r for r in records if not r.terminal), key=lambda r: r.created_at)

    def update(self, job_id: str, change: Change, checkpoint: bytes | None = None) -> JobRecord:
        key = self._job(job_id)

        def write(pipe: Pipeline) -> JobRecord:
            raw = pipe.get(key)
            current = self._parse(job_id, raw) if raw is not None else None
            if current is None:
                raise JobNotFound(job_id)
            record = change(current)
            pipe.multi()
            pipe.set(key, record.model_dump_json())
            if checkpoint is not None:
                pipe.set(self._job(job_id, "checkpoint"), checkpoint)
            if record.terminal:
                pipe.delete(self._job(job_id, "dataset"), self._job(job_id, "checkpoint"))
                pipe.srem(self._active(), job_id)
                pipe.srem(self._active(record.tenant), job_id)
            return record

        return cast(JobRecord, self._call(lambda: self.client.transaction(write, key, value_from_callable=True)))

    def dataset(self, job_id: str) -> Dataset:
        raw = cast(Union[bytes, None], self._call(lambda: self.client.get(self._job(job_id, "dataset"))))  # noqa: UP007
        if raw is None:
            raise JobNotFound(job_id)
        return Dataset.from_json(raw)

    def load_checkpoint(self, job_id: str) -> bytes | None:
        return cast(Union[bytes, None], self._call(lambda: self.client.get(self._job(job_id, "checkpoint"))))  # noqa: UP007

    # Turns: the fair order of tenants

    def take_turn(self, tenant: str) -> None:
        self._call(
            lambda: self._take_turn(keys=[f"{self.ns}:training:turns", f"{self.ns}:training:turn"], args=[tenant])
        )

    def tenant_turns(self) -> dict[str, int]:
        turns = self._call(lambda: self.client.hgetall(f"{self.ns}:training:turns"))
        return {tenant.decode(): int(turn) for tenant, turn in turns.items()}

    # Leases: a running job's liveness, kept by its worker

    def hold_lease(self, job_id: str, holder: str, ttl_s: float) -> None:
        self._call(lambda: self.client.set(self._job(job_id, "lease"), holder, px=max(1, int(ttl_s * 1000))))

    def lease_holder(self, job_id: str) -> str | None:
        value = cast(Union[bytes, None], self._call(lambda: self.client.get(self._job(job_id, "lease"))))  # noqa: UP007
        return value.decode() if value is not None else None

    def drop_lease(self, job_id: str, holder: str) -> None:
        if self.lease_holder(job_id) == holder:
            self._call(lambda: self.client.delete(self._job(job_id, "lease")))

    def close(self) -> None:
        self.client.close()
