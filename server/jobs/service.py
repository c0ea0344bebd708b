"""`TrainingService`: what the API does with training jobs (parse a submission, submit, read, list, cancel).

The job store and queue come from the backend (`server.backend`), and the service is the same in both modes:
- disk (embedded): records under `<data_dir>/jobs/`, one worker thread in this process; the trained prompt
  is registered through this server's `PromptRegistry` (`registry_publisher`), so its caches drop at once.
- Redis: records in Redis, deliveries on an RQ queue for `softserve worker` processes (this process trains
  nothing); their prompts reach every replica through the Redis registry's notices.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ParamSpec, TypeVar

import torch

from prompt_store import SoftPrompt, TaskMetadata, TaskNotFound, TaskRecord
from server.errors import InvalidInput
from server.jobs import submission
from server.jobs.dataset import Dataset, check_input_lengths
from server.jobs.errors import InvalidDataset, JobNotFound, JobStoreUnavailable
from server.jobs.job_runner import EnsembleSetter, Publisher
from server.jobs.queue import JobQueue
from server.jobs.records import JobRecord, cancelled, new_record
from server.jobs.store import JobStore
from server.jobs.submission import FormParts, Submission
from server.metrics import TrainingMetrics
from server.registry.registry import PromptRegistry
from server.serving.model import FrozenT5
from server.tenancy.quotas import TaskQuota
from server.training import PromptTrainer, TrainingConfig

P = ParamSpec("P")
T = TypeVar("T")

# Submissions parsed and checked at once (each takes a core for up to seconds); the rest wait their turn.
SUBMISSION_WORK_CONCURRENCY = 2


@dataclass(frozen=True)
class TrainingLimits:
    """What a job may ask for: no more than this server serves (prompt length, batch, target length) or runs."""

    max_steps: int
    max_prompt_length: int
    max_batch_size: int
    max_target_tokens: int
    max_input_tokens: int
    max_active_jobs: int  # per tenant, queued or running (0: no limit)


class TrainingService:
    def __init__(
        self,
        model: FrozenT5,
        store: JobStore,
        queue: JobQueue,
        metrics: TrainingMetrics,
        limits: TrainingLimits,
        quota: TaskQuota,
        registry: PromptRegistry,
    ) -> None:
        self.model = model
        self.registry = registry  # where `init: "task"` reads its source prompt
        self.store = store
        self.queue = queue
        self.metrics = metrics
        self.limits = limits
        self.quota = quota
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

    async def submission_from_json(self, body: bytes) -> Submission:
        return await self.off_loop(submission.from_json, body, self.check_limits)

    async def submission_from_form(self, parts: FormParts) -> Submission:
        return await self.off_loop(submission.from_form, parts, self.check_limits)

    async def submit(self, tenant: str, job: Submission) -> JobRecord:
        """Checks everything a worker would trip on, then stores and queues the job (or nothing at all)."""
        options = job.options
        await self.quota.check(tenant, options.task_id)  # the trained prompt becomes a task
        config, source = await self._transfer_source(tenant, options.config)
        self.check_limits(config)
        dataset = replace(job.dataset, source_prompt=source)
        await self.off_loop(self._check, job, config, dataset)
        record = new_record(tenant, options.task_id, config, options.activate)
        await asyncio.to_thread(self.store.create, record, dataset, self.limits.max_active_jobs)
        self.metrics.jobs.labels(state="queued").inc()
        # Stored but not queued (Redis went away in between): a worker's reaper queues it once Redis answers.
        with contextlib.suppress(JobStoreUnavailable):
            self.queue.submit(record.job_id, record.attempt)
        return record

    def check_limits(self, config: TrainingConfig) -> None:
        """A job may not ask for more than this server serves (longer prompts, bigger batches, longer targets)
        or runs (more steps). Cheap: the API also calls it before parsing a submission's data sets."""
        s = self.limits
        limits = (
            ("steps", config.steps, "training_max_steps", s.max_steps),
            ("prompt_length", config.prompt_length, "max_prompt_length", s.max_prompt_length),
            ("batch_size", config.batch_size, "max_batch_size", s.max_batch_size),
            ("max_target_tokens", config.max_target_tokens, "max_new_tokens", s.max_target_tokens),
        )
        for field, value, setting, limit in limits:
            if value > limit:
                raise InvalidInput(f"config.{field} {value} is over this server's {setting} of {limit}")

    async def _transfer_source(self, tenant: str, config: TrainingConfig) -> tuple[TrainingConfig, torch.Tensor | None]:
        """`init: "task"`: the caller's source prompt, read now (404 for a task or version the caller does not
        have), and the config pinned to the version read; a `prompt_length` left out becomes the source's."""
        if config.init != "task":
            return config, None
        task_id, version = config.init_source()
        if version is None:
            version = (await self.registry.task(tenant, task_id)).active_version
            if version is None:
                raise TaskNotFound(task_id)
        source = await self.registry.load_prompt(tenant, task_id, version)
        if source.d_model != self.model.d_model:
            raise InvalidInput(
                f"config.init_task {task_id}@{version} is {source.d_model} wide; this model's d_model is "
                f"{self.model.d_model}"
            )
        pinned: dict[str, object] = {"init_task": f"{task_id}@{version}"}
        if "prompt_length" not in config.model_fields_set:
            pinned["prompt_length"] = source.length
        return config.model_copy(update=pinned), source.embeddings

    def _check(self, job: Submission, config: TrainingConfig, dataset: Dataset) -> None:
        for split in (job.train, job.eval):
            if split is not None:
                check_input_lengths(self.model, split, self.limits.max_input_tokens)
        try:  # the trainer's own checks (label set for rank accuracy, init text, ...), on a throw-away trainer
            PromptTrainer(self.model, dataset.train, dataset.eval, config, source_prompt=dataset.source_prompt)
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


def registry_ensemble_setter(registry: PromptRegistry, loop: asyncio.AbstractEventLoop) -> EnsembleSetter:
    """Sets a task's ensemble from the worker thread through the registry on the event loop (so its caches drop)."""

    def set_ensemble(tenant: str, task_id: str, versions: list[int]) -> TaskRecord:
        return asyncio.run_coroutine_threadsafe(registry.set_ensemble(tenant, task_id, versions), loop).result()

    return set_ensemble


def registry_publisher(registry: PromptRegistry, loop: asyncio.AbstractEventLoop) -> Publisher:
    """Registers from the worker thread through the registry on the event loop (so its caches drop)."""

    def publish(
        tenant: str, task_id: str, prompt: SoftPrompt, metadata: TaskMetadata | None, activate: bool, model: str
    ) -> TaskRecord:
        coroutine = registry.add_version(tenant, task_id, prompt, metadata, activate, model)
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result()

    return publish
