"""A running job's lease in Redis: proof that its worker is alive, renewed by a thread of that worker.

The reaper (`server.jobs.reaper`) takes back a running job whose lease has expired.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from server.jobs.errors import JobStoreUnavailable
from server.jobs.redis_store import RedisJobStore

log = logging.getLogger(__name__)


class RedisLease:
    """`JobRunner`'s lease: held while a delivery runs, renewed by a thread every third of its TTL."""

    def __init__(self, store: RedisJobStore, ttl_s: float) -> None:
        self.store = store
        self.ttl_s = ttl_s

    @contextmanager
    def __call__(self, job_id: str, holder: str) -> Iterator[None]:
        self.store.hold_lease(job_id, holder, self.ttl_s)
        done = threading.Event()
        thread = threading.Thread(target=self._renew, args=(job_id, holder, done), name=f"lease-{job_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            try:
                self.store.drop_lease(job_id, holder)
            except JobStoreUnavailable:
                log.warning("job %s: could not drop the lease (it expires by itself)", job_id)

    def _renew(self, job_id: str, holder: str, done: threading.Event) -> None:
        while not done.wait(self.ttl_s / 3):
            try:
                self.store.hold_lease(job_id, holder, self.ttl_s)
            except JobStoreUnavailable as error:
                log.warning("job %s: lease renewal failed: %s", job_id, error)
