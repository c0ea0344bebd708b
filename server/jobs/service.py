"""`TrainingService`: what the API does with training jobs (submit, read, list, cancel), in either mode.

- `store=disk` (embedded): records under `<data_dir>/jobs/`, one worker thread in this process; the
  trained prompt is registered through this server's `PromptRegistry`, so its caches drop at once.
- `store=redis`: records in Redis, deliveries on an RQ queue for `softserve worker` processes (this
  process trains nothing); their prompts reach every replica through the Redis registry's notices.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import redis

from prompt_store import SoftPrompt, TaskMetadata, TaskRecord
from server.errors import InvalidInput
from server.jobs.dataset import Dataset, ExampleSet, check_input_lengths
from server.jobs.errors import InvalidDataset, JobNotFound, JobStoreUnavailable
from server.jobs.queue import JobQueue, ThreadQueue
from server.jobs.records import JobRecord, cancelled, new_record
from server.jobs.redis_store import RedisJobStore
from server.jobs.rq_queue import RQJobQueue
from server.jobs.runner import JobRunner, Publisher
from server.jobs.schemas import JobOptions
from server.jobs.store import DiskJobStore, JobStore
from server.metrics import TrainingMetrics
from server.model import FrozenT5
from server.registry import PromptRegistry
from server.settings import Settings
from server.training import PromptTrainer, TrainingConfig

P = ParamSpec("P")
T = TypeVar("T")

# Submissions parsed and checked at once (each takes a core for up to seconds); the rest wait their turn.
SUBMISSION_WORK_CONCURRENCY = 2


@dataclass
class Submission:
    options: JobOptions
    train: ExampleSet
    eval: ExampleSet | None

    @property
    def dataset(self) -> Dataset:
        return Dataset(train=self.train.examples, eval=self.eval.examples if self.eval else [])


class TrainingService:
    def __init__(
        self, settings: Settings, model: FrozenT5, store: JobStore, queue: JobQueue, metrics: TrainingMetrics
    ) -> None:
        self.settings = settings
        self.model = model
        self.store = store
        self.queue = queue
        self.metrics = metrics
        self._submission_work = asyncio.Semaphore(SUBMISSION_WORK_CONCURRENCY)

    async def off_loop(self, work: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Runs a submission's CPU-heavy work (parsing, tokenizing) in a worker thread, a few at a time:
        a large upload must neither stall the event loop nor take every core from the model."""
        async with self._submission_work:
            return await asyncio.to_thread(work, *args, **kwargs)

    async def start(self) -> None:
        await asyncio.to_thread(self.queue.start)

    async def stop(self) -> None:
        await asyncio.to_thread(self.queue.stop)
        if isinstance(self.store, RedisJobStore):
            self.store.close()

    async def submit(self, tenant: str, submission: Submission) -> JobRecord:
        """Checks everything a worker would trip on, then stores and queues the job (or nothing at all)."""
        options = submission.options
        self.check_limits(options.config)
        await self.off_loop(self._check, submission)
        record = new_record(tenant, options.task_id, options.config, options.activate)
        await asyncio.to_thread(self.store.create, record, submission.dataset, self.settings.training_max_active_jobs)
        self.metrics.jobs.labels(state="queued").inc()
        # Stored but not queued (Redis went away in between): a worker's reaper queues it once Redis answers.
        with contextlib.suppress(JobStoreUnavailable):
            self.queue.submit(record.job_id, record.attempt)
        return record

    def check_limits(self, config: TrainingConfig) -> None:
        """A job may not ask for more than this server serves (longer prompts, bigger batches, longer targets)
        or runs (more steps). Cheap: the API also calls it before parsing a submission's data sets."""
        s = self.settings
        limits = (
            ("steps", config.steps, "training_max_steps", s.training_max_steps),
            ("prompt_length", config.prompt_length, "max_prompt_length", s.max_prompt_length),
            ("batch_size", config.batch_size, "max_batch_size", s.max_batch_size),
            ("max_target_tokens", config.max_target_tokens, "max_new_tokens", s.max_new_tokens),
        )
        for field, value, setting, limit in limits:
            if value > limit:
                raise InvalidInput(f"config.{field} {value} is over this server's {setting} of {limit}")

    def _check(self, submission: Submission) -> None:
        for split in (submission.train, submission.eval):
            if split is not None:
                check_input_lengths(self.model, split, self.settings.max_input_tokens)
        dataset = submission.dataset
        try:  # the trainer's own checks (label set for rank accuracy, init text, ...), on a throw-away trainer
            PromptTrainer(self.model, dataset.train, dataset.eval, submission.options.config)
        except ValueError as error:
            raise InvalidDataset(str(error)) from None

    async def get(self, tenant: str, job_id: str) -> JobRecord:
        return _owned_by(tenant, await asyncio.to_thread(self.store.get, job_id))

    async def tenant_jobs(self, tenant: str) -> list[JobRecord]:
        return await asyncio.to_thread(self.store.tenant_jobs, tenant)

    async def cancel(self, tenant: str, job_id: str) -> JobRecord:
        record = await asyncio.to_thread(self.store.update, job_id, lambda r: cancelled(_owned_by(tenant, r)))
        self.metrics.jobs.labels(state="cancelled").inc()
        return record


def _owned_by(tenant: str, record: JobRecord) -> JobRecord:
    if record.tenant != tenant:
        raise JobNotFound(record.job_id)
    return record


def registry_publisher(registry: PromptRegistry, loop: asyncio.AbstractEventLoop) -> Publisher:
    """Registers from the worker thread through the registry on the event loop (so its caches drop)."""

    def publish(
        tenant: str, task_id: str, prompt: SoftPrompt, metadata: TaskMetadata | None, activate: bool, model: str
    ) -> TaskRecord:
        coroutine = registry.add_version(tenant, task_id, prompt, metadata, activate, model)
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result()

    return publish


def build_training(
    settings: Settings, model: FrozenT5, registry: PromptRegistry, metrics: TrainingMetrics
) -> TrainingService:
    """The service for this server's mode; call from the event loop (the in-process worker publishes on it)."""
    if settings.store == "redis":
        store: JobStore = RedisJobStore.from_url(settings.redis_url, settings.redis_namespace, settings.redis_timeout_s)
        connection = redis.Redis.from_url(settings.redis_url, socket_timeout=settings.redis_timeout_s)
        return TrainingService(settings, model, store, RQJobQueue(connection, settings), metrics)
    store = DiskJobStore(settings.data_dir / "jobs")
    runner = JobRunner(
        model,
        store,
        registry_publisher(registry, asyncio.get_running_loop()),
        metrics,
        worker_name=f"{socket.gethostname()}-{os.getpid()}-in-process",
        checkpoint_every=settings.training_checkpoint_every,
        requeue=lambda job_id, attempt: None,
        time_slice_s=settings.training_time_slice_s,
    )
    queue = ThreadQueue(runner, settings.training_max_attempts)
    runner.requeue = queue.submit
    return TrainingService(settings, model, store, queue, metrics)
