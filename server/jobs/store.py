"""Where job records, their datasets and checkpoints live: the `JobStore` protocol and its disk backend.

Disk layout (`<data_dir>/jobs/`), one directory per job, every file written atomically:
`<job_id>/record.json`, `<job_id>/dataset.json` (until the job ends), `<job_id>/checkpoint.pt` (while it runs).
The disk store serves one process (the embedded server with its in-process worker); API replicas and
workers on several machines share `RedisJobStore` instead.

A record that does not read back (corrupt, or written by a version that stored what no longer validates)
is quarantined: moved to `quarantine/` and logged, and from then on the job does not exist. One bad
record must never fail a listing, a tenant, the worker or the server's start-up.
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from prompt_store.atomic import write_atomically
from server.jobs.dataset import Dataset
from server.jobs.errors import JobNotFound, TooManyJobs
from server.jobs.records import JOB_ID_PATTERN, JobRecord

log = logging.getLogger(__name__)

Change = Callable[[JobRecord], JobRecord]

_JOB_ID = re.compile(JOB_ID_PATTERN)


def too_many(tenant: str, limit: int) -> TooManyJobs:
    return TooManyJobs(f"tenant '{tenant}' already has {limit} queued or running training job(s); wait for one to end")


class JobStore(Protocol):
    def create(self, record: JobRecord, dataset: Dataset, max_active: int = 0) -> None:
        """Stores a new job; raises `TooManyJobs` if the tenant has `max_active` unfinished jobs (0: no cap)."""

    def get(self, job_id: str) -> JobRecord: ...

    def tenant_jobs(self, tenant: str) -> list[JobRecord]:
        """The tenant's jobs, newest first."""

    def active(self) -> list[JobRecord]:
        """Every unfinished job, oldest first."""

    def update(self, job_id: str, change: Change, checkpoint: bytes | None = None) -> JobRecord:
        """Applies `change` atomically, storing `checkpoint` with it (only if the change applies).

        A job entering a final state drops its dataset and checkpoint.
        """

    def dataset(self, job_id: str) -> Dataset: ...

    def load_checkpoint(self, job_id: str) -> bytes | None: ...

    def take_turn(self, tenant: str) -> None:
        """Records that a worker just took one of `tenant`'s jobs (see `server.jobs.fairness`)."""

    def tenant_turns(self) -> dict[str, int]:
        """When each tenant was last served: larger is more recent; a tenant never served is absent."""


class DiskJobStore:
    RECORD, DATASET, CHECKPOINT = "record.json", "dataset.json", "checkpoint.pt"
    QUARANTINE = "quarantine"

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        # Turns live in memory: the disk store serves one process, and after a restart every tenant is even.
        self._turns: dict[str, int] = {}
        self._turn = itertools.count(1)

    def _dir(self, job_id: str) -> Path:
        if not _JOB_ID.match(job_id):
            raise JobNotFound(job_id)
        return self.root / job_id

    def _write(self, record: JobRecord) -> None:
        write_atomically(self._dir(record.job_id) / self.RECORD, record.model_dump_json().encode())

    def _read(self, path: Path) -> JobRecord | None:
        """The record at `path`; None when there is none, or it was unreadable and is now quarantined."""
        try:
            return JobRecord.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except (ValueError, OSError) as error:  # a pydantic ValidationError is a ValueError
            self._quarantine(path.parent, error)
            return None

    def _quarantine(self, job_dir: Path, error: Exception) -> None:
        aside = self.root / self.QUARANTINE / f"{job_dir.name}.{time.time_ns()}"
        with self._lock:
            try:
                aside.parent.mkdir(exist_ok=True)
                job_dir.rename(aside)
            except FileNotFoundError:
                return  # another reader moved it first
            except OSError as failure:
                log.error(
                    "job record in %s is unreadable (%s) and could not be moved aside: %s", job_dir, error, failure
                )
                return
        log.error("job %s: its record is unreadable and was moved to %s: %s", job_dir.name, aside, error)

    def _records(self) -> list[JobRecord]:
        found = (self._read(path) for path in self.root.glob(f"*/{self.RECORD}"))
        return [record for record in found if record is not None]

    def create(self, record: JobRecord, dataset: Dataset, max_active: int = 0) -> None:
        with self._lock:
            if max_active:
                unfinished = [r for r in self._records() if r.tenant == record.tenant and not r.terminal]
                if len(unfinished) >= max_active:
                    raise too_many(record.tenant, max_active)
            write_atomically(self._dir(record.job_id) / self.DATASET, dataset.to_json())
            self._write(record)

    def get(self, job_id: str) -> JobRecord:
        record = self._read(self._dir(job_id) / self.RECORD)
        if record is None:
            raise JobNotFound(job_id)
        return record

    def tenant_jobs(self, tenant: str) -> list[JobRecord]:
        records = [r for r in self._records() if r.tenant == tenant]
        return sorted(records, key=lambda r: r.created_at, reverse=True)

    def active(self) -> list[JobRecord]:
        return sorted((r for r in self._records() if not r.terminal), key=lambda r: r.created_at)

    def update(self, job_id: str, change: Change, checkpoint: bytes | None = None) -> JobRecord:
        with self._lock:
            record = change(self.get(job_id))
            if checkpoint is not None:
                write_atomically(self._dir(job_id) / self.CHECKPOINT, checkpoint)
            self._write(record)
            if record.terminal:
                for name in (self.DATASET, self.CHECKPOINT):
                    (self._dir(job_id) / name).unlink(missing_ok=True)
            return record

    def dataset(self, job_id: str) -> Dataset:
        try:
            return Dataset.from_json((self._dir(job_id) / self.DATASET).read_bytes())
        except FileNotFoundError:
            raise JobNotFound(job_id) from None

    def load_checkpoint(self, job_id: str) -> bytes | None:
        try:
            return (self._dir(job_id) / self.CHECKPOINT).read_bytes()
        except FileNotFoundError:
            return None

    def take_turn(self, tenant: str) -> None:
        with self._lock:
            self._turns[tenant] = next(self._turn)

    def tenant_turns(self) -> dict[str, int]:
        with self._lock:
            return dict(self._turns)
