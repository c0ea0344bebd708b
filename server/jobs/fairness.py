"""The order in which workers take queued training jobs: round-robin across tenants.

A queue in submission order lets one tenant's many (or endless) jobs starve every other tenant. Instead,
whenever a worker is free it takes the oldest queued job of the tenant served longest ago (a tenant never
served first), and marks that tenant's turn (`JobStore.take_turn`). Both modes decide this way, when a
worker picks: the in-process thread and `softserve worker` processes, whose turns are shared in Redis.
A delivery on the queue (a wake-up of the in-process worker, an RQ job) therefore means "run the next job
in the fair order", whichever job queued it. A long job also gives up its worker after
`training_time_slice_s` when another tenant has a job waiting (`server.jobs.job_runner`), so a turn is
bounded in time too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from server.jobs.records import JobRecord, JobState


def fair_order(active: Iterable[JobRecord], turns: Mapping[str, int]) -> list[JobRecord]:
    """The queued jobs among `active`, the next one to run first."""
    queued = (record for record in active if record.state == JobState.QUEUED)
    return sorted(queued, key=lambda record: (turns.get(record.tenant, 0), record.created_at))


def others_waiting(active: Iterable[JobRecord], tenant: str) -> bool:
    """Another tenant has a queued job (so a job of `tenant` past its time slice should yield)."""
    return any(record.state == JobState.QUEUED and record.tenant != tenant for record in active)
