"""Taking back jobs whose worker is gone: requeue from the last checkpoint, or fail after `max_attempts`."""

from __future__ import annotations

import logging
from collections.abc import Callable

from server.jobs.errors import JobConflict, JobNotFound
from server.jobs.records import JobRecord, JobState, abandoned
from server.jobs.store import JobStore
from server.metrics import TrainingMetrics

log = logging.getLogger(__name__)

Submit = Callable[[str, int], None]


def requeue_abandoned(
    store: JobStore,
    record: JobRecord,
    max_attempts: int,
    reason: str,
    submit: Submit,
    metrics: TrainingMetrics,
) -> JobRecord | None:
    """Requeues (or fails) `record` unless it changed since it was read; returns the new record."""
    try:
        updated = store.update(record.job_id, lambda r: abandoned(r, record, max_attempts, reason))
    except (JobConflict, JobNotFound):
        return None
    metrics.jobs.labels(state=updated.state.value).inc()
    if updated.state == JobState.QUEUED:
        log.warning("job %s: %s; requeued (attempt %d)", record.job_id, reason, updated.attempt)
        submit(updated.job_id, updated.attempt)
    else:
        log.warning("job %s: %s; failed: %s", record.job_id, reason, updated.error)
    return updated
