"""The composition root: every component built once from the settings at start-up, and its life cycle (kept on
`app.state`). Only this module, the app, the CLI, the worker and the backend read `Settings`."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, TypeVar

from server.backend import Backend, open_backend
from server.engine.client import EngineClient
from server.engine.executor import EngineExecutor
from server.engine.limits import engine_limits
from server.engine.link import EngineLink
from server.engine.thread_link import ThreadLink
from server.jobs.job_runner import JobRunner, Requeue
from server.jobs.service import TrainingLimits, TrainingService, registry_ensemble_setter, registry_publisher
from server.metrics import BatcherMetrics, ServerMetrics, TrainingMetrics
from server.registry.registry import PromptRegistry, TaskKey
from server.registry.service import PromptService
from server.registry.sync import RegistrySync
from server.serving.batch_runner import AnyWork, BatchRunner, WorkResult
from server.serving.batcher import TenantFairBatcher
from server.serving.executor import Executor, StaticExecutor
from server.serving.limits import ServingLimits
from server.serving.load_errors import ModelLoadError
from server.serving.model import FrozenT5
from server.serving.service import InferenceService
from server.settings import Settings
from server.tenancy.keys import DEFAULT_TENANT, ApiKeys
from server.tenancy.management_budget import ManagementBudget
from server.tenancy.quotas import TaskQuota
from server.tenancy.rate_limits import TenantRateLimits

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

log = logging.getLogger(__name__)

REDIS_CONNECT_WAIT_S = 3.0
DEGRADED = (
    "the prompt registry's Redis is unreachable ({problem}): serving from the prompt cache and the disk mirror; "
    "prompt changes answer 503 until it is back"
)


@dataclass
class Components:
    settings: Settings
    model: FrozenT5
    backend: Backend
    registry: PromptRegistry
    executor: Executor
    inference: InferenceService
    training: TrainingService
    prompts: PromptService
    management: ManagementBudget  # every authenticated route but inference (`api.deps.management_budget`)
    sync: RegistrySync | None = None

    def degraded(self) -> str | None:
        """Why this replica is serving with reduced function, or None when it is not."""
        if self.sync is not None and not self.sync.healthy:
            return DEGRADED.format(problem=self.sync.problem)
        return None

    def engine_down(self) -> str | None:
        """Why this replica cannot serve inference now (its engine is down), or None."""
        if isinstance(self.executor, EngineExecutor) and not self.executor.client.healthy:
            return f"the engine is down: {self.executor.client.problem}"
        return None

    async def stop(self) -> None:
        await self.training.stop()  # first: the in-process worker may be registering a prompt
        await self.executor.stop()
        if self.sync is not None:
            await self.sync.stop()
        await self.registry.stop()
        self.backend.close()


def preload_task_keys(settings: Settings) -> list[TaskKey]:
    """`preload_tasks` entries (`tenant/task`, or `task` of the default tenant) as (tenant, task_id)."""
    pairs = [name.partition("/") for name in settings.preload_tasks]
    return [(tenant, task_id) if sep else (DEFAULT_TENANT, tenant) for tenant, sep, task_id in pairs]


Limits = TypeVar("Limits", bound="DataclassInstance")


def limits_of(settings: Settings, kind: type[Limits], **setting_of: str) -> Limits:
    """A limits dataclass filled from the settings: each field from the setting of its name, or of the name
    `setting_of` gives it."""
    names = [limit.name for limit in fields(kind)]
    return kind(**{name: getattr(settings, setting_of.get(name, name)) for name in names})


def serving_limits(settings: Settings) -> ServingLimits:
    return limits_of(settings, ServingLimits)


def json_body_limit(settings: Settings) -> int:
    """`max_json_body_bytes`, or room for every input of a request at its character limit, 4 bytes a character
    (any UTF-8), and 1 MiB for the rest."""
    if settings.max_json_body_bytes:
        return settings.max_json_body_bytes
    return 4 * settings.max_inputs_per_request * serving_limits(settings).max_chars + 1024 * 1024


def training_limits(settings: Settings) -> TrainingLimits:
    return limits_of(
        settings,
        TrainingLimits,
        max_steps="training_max_steps",
        max_target_tokens="max_new_tokens",
        max_active_jobs="training_max_active_jobs",
    )


def engine_link(settings: Settings, model: FrozenT5, model_given: bool, metrics: ServerMetrics) -> EngineLink:
    """The engine runs in its own process unless `engine` is `thread`, or the app was built around a model
    object (only this process has it)."""
    if settings.engine == "thread" or model_given:
        return ThreadLink(model, engine_limits(settings))
    from server.engine.process_link import ProcessLink

    return ProcessLink(settings, metrics=metrics.engine)


async def start_executor(settings: Settings, model: FrozenT5, metrics: ServerMetrics, model_given: bool) -> Executor:
    if settings.scheduler == "static":
        return StaticExecutor(await start_batcher(settings, model, metrics))
    link = engine_link(settings, model, model_given, metrics)
    if settings.warmup and isinstance(link, ThreadLink):
        await asyncio.to_thread(model.warmup)
    client = EngineClient(link, settings.max_queue_size, metrics, engine_limits(settings))
    await client.start()
    return EngineExecutor(client, model)


async def start_batcher(
    settings: Settings, model: FrozenT5, metrics: ServerMetrics
) -> TenantFairBatcher[AnyWork, WorkResult]:
    batcher: TenantFairBatcher[AnyWork, WorkResult] = TenantFairBatcher(
        BatchRunner(model, metrics),
        max_batch_size=settings.max_batch_size,
        max_batch_tokens=settings.max_batch_tokens,
        max_wait_ms=settings.max_wait_ms,
        max_queue_size=settings.max_queue_size,
        observer=BatcherMetrics(metrics),
    )
    batcher.start()
    if settings.warmup:
        await batcher.run_exclusive(model.warmup)
    return batcher


def training_service(
    settings: Settings,
    model: FrozenT5,
    backend: Backend,
    registry: PromptRegistry,
    metrics: TrainingMetrics,
    quota: TaskQuota,
) -> TrainingService:
    """Call from the event loop: a worker thread of this process, if the backend trains here, publishes on it."""
    publish = registry_publisher(registry, asyncio.get_running_loop())
    set_ensemble = registry_ensemble_setter(registry, asyncio.get_running_loop())

    def in_process_runner(requeue: Requeue) -> JobRunner:
        return JobRunner(
            model,
            backend.jobs,
            publish,
            metrics,
            worker_name=f"{socket.gethostname()}-{os.getpid()}-in-process",
            checkpoint_every=settings.training_checkpoint_every,
            requeue=requeue,
            time_slice_s=settings.training_time_slice_s,
            set_ensemble=set_ensemble,
        )

    queue = backend.training_queue(in_process_runner)
    return TrainingService(model, backend.jobs, queue, metrics, training_limits(settings), quota, registry)


async def build_components(settings: Settings, metrics: ServerMetrics, model: FrozenT5 | None = None) -> Components:
    model_given = model is not None
    if model is None:
        model = await asyncio.to_thread(FrozenT5.load, settings.model, settings.device, settings.dtype)
    model.use_cpu_threads(settings.cpu_threads)
    backend = open_backend(settings)
    registry = PromptRegistry(
        backend.prompts,
        model.prompt_on_device,
        int(settings.prompt_cache_mb * 1024 * 1024),
        metrics,
        pinned=preload_task_keys(settings),
        residency=backend.residency,
    )
    sync = backend.registry_sync(registry, metrics, settings.registry_reconcile_s)
    try:
        if sync is not None:
            await sync.start(wait_s=REDIS_CONNECT_WAIT_S)
        await registry.preload()
        await registry.warm_up(settings.warmup_prompts)
        executor = await start_executor(settings, model, metrics, model_given)
    except BaseException:
        if sync is not None:
            await sync.stop()
        backend.close()
        raise
    limits = serving_limits(settings)
    rate_limits = TenantRateLimits(
        settings.rate_limit_requests_per_s, settings.rate_limit_tokens_per_s, backend.rate_limit_storage()
    )
    inference = InferenceService(model, registry, executor, limits, rate_limits)
    quota = TaskQuota(registry, settings.max_tasks_per_tenant)
    training = training_service(settings, model, backend, registry, metrics.training, quota)
    await training.start()
    prompts = PromptService(
        model,
        registry,
        limits,
        quota,
        embeddings_per_tenant=settings.similar_embeddings_per_tenant,
        max_pinned=settings.max_pinned_per_tenant,
    )
    management = ManagementBudget(settings.rate_limit_management_cost_per_s, backend.rate_limit_storage())
    return Components(settings, model, backend, registry, executor, inference, training, prompts, management, sync)


@dataclass
class Lifecycle:
    """What `/ready` reports, and the components once built."""

    settings: Settings
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    phase: str = "starting"  # starting | ready | draining | failed
    reason: str = ""
    components: Components | None = None
    api_keys: ApiKeys = field(init=False)

    def __post_init__(self) -> None:
        self.api_keys = ApiKeys(self.settings.keys_file, self.settings.auth)

    async def start(self, model: FrozenT5 | None) -> None:
        try:
            self.components = await build_components(self.settings, self.metrics, model)
            if self.phase == "starting":  # a SIGTERM during start-up keeps it draining
                self.phase = "ready"
            model = self.components.model  # the line to wait for: uvicorn's "running on" comes before the model
            log.info(
                "ready at http://%s:%s: model %s on %s",
                self.settings.host,
                self.settings.port,
                model.model_id,
                model.device,
            )
        except ModelLoadError as error:  # the operator's to fix, and the message says how: no traceback
            self.phase, self.reason = "failed", str(error)
        except Exception as error:
            log.exception("start-up failed")
            self.phase, self.reason = "failed", f"start-up failed: {type(error).__name__}: {error}"

    async def stop(self) -> None:
        if self.phase != "failed":  # `softserve serve` reads a failed start-up after the server stopped
            self.phase = "draining"
        if self.components is not None:
            await self.components.stop()
