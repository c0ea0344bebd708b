"""Errors of training jobs; the API maps each one to an HTTP status in `server.api.errors`."""

from __future__ import annotations

from prompt_store.errors import RetryLater


class JobError(Exception):
    """Base class: the message is written for the client."""


class JobNotFound(JobError):
    """No such job, or another tenant's (which must look the same)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"training job '{job_id}' does not exist")
        self.job_id = job_id


class JobConflict(JobError):
    """The change does not apply to the job's current state (e.g. cancelling a finished job)."""


class InvalidDataset(JobError):
    """A train or eval set, or the job's config, cannot be trained on; the message names the line."""


class TooManyJobs(JobError, RetryLater):
    """The tenant already has its quota of queued and running jobs."""

    default_retry_after_s = 30.0


class JobStoreUnavailable(JobError, RetryLater):
    """The job store (Redis) cannot be reached right now."""
