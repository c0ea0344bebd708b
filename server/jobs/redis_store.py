"""`RedisJobStore`: job records shared by API replicas and `softserve worker` processes.

Keys (under `namespace`; tenant names cannot hold `:`):
- `{ns}:job:{id}` the record (JSON); `{ns}:job:{id}:dataset` the train/eval sets until the job ends;
  `{ns}:job:{id}:checkpoint` the last checkpoint (bytes) while it runs;
  `{ns}:job:{id}:lease` who runs it, with a TTL its worker keeps renewing (see `server.jobs.rq_queue`).
- `{ns}:jobs:{tenant}` sorted set of the tenant's job ids by creation time;
  `{ns}:jobs:active` and `{ns}:jobs:active:{tenant}` sets of unfinished job ids.

Every change is an optimistic transaction (WATCH the record, MULTI/EXEC), so a cancel from an API replica
and a worker's progress never overwrite each other: one of them retries on the other's result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, Union, cast

import redis
from redis.client import Pipeline

from server.jobs.dataset import Dataset
from server.jobs.errors import JobNotFound, JobStoreUnavailable
from server.jobs.records import JobRecord
from server.jobs.store import Change, too_many

T = TypeVar("T")


class RedisJobStore:
    def __init__(self, client: redis.Redis, namespace: str = "softserve") -> None:
        self.client = client
        self.ns = namespace

    @classmethod
    def from_url(cls, url: str, namespace: str, timeout_s: float) -> RedisJobStore:
        return cls(redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s), namespace)

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

    def create(self, record: JobRecord, dataset: Dataset, max_active: int = 0) -> None:
        tenant_active = self._active(record.tenant)

        def write(pipe: Pipeline) -> None:
            if max_active and pipe.scard(tenant_active) >= max_active:
                raise too_many(record.tenant, max_active)
            pipe.multi()
            pipe.set(self._job(record.job_id, "dataset"), dataset.to_json())
            pipe.set(self._job(record.job_id), record.model_dump_json())
            pipe.zadd(self._tenant_jobs(record.tenant), {record.job_id: record.created_at})
            pipe.sadd(self._active(), record.job_id)
            pipe.sadd(tenant_active, record.job_id)

        self._call(lambda: self.client.transaction(write, tenant_active))

    def get(self, job_id: str) -> JobRecord:
        raw = self._call(lambda: self.client.get(self._job(job_id)))
        if raw is None:
            raise JobNotFound(job_id)
        return JobRecord.model_validate_json(raw)

    def _many(self, job_ids: list[Any]) -> list[JobRecord]:
        if not job_ids:
            return []
        keys = [self._job(i.decode() if isinstance(i, bytes) else i) for i in job_ids]
        return [JobRecord.model_validate_json(raw) for raw in self._call(lambda: self.client.mget(keys)) if raw]

    def tenant_jobs(self, tenant: str) -> list[JobRecord]:
        return self._many(self._call(lambda: self.client.zrevrange(self._tenant_jobs(tenant), 0, -1)))

    def active(self) -> list[JobRecord]:
        records = self._many(list(self._call(lambda: self.client.smembers(self._active()))))
        return sorted((r for r in records if not r.terminal), key=lambda r: r.created_at)

    def update(self, job_id: str, change: Change, checkpoint: bytes | None = None) -> JobRecord:
        key = self._job(job_id)

        def write(pipe: Pipeline) -> JobRecord:
            raw = pipe.get(key)
            if raw is None:
                raise JobNotFound(job_id)
            record = change(JobRecord.model_validate_json(raw))
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
