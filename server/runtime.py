"""The serving components and their life cycle: built once at start-up, kept on `app.state`."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from prompt_store import DiskStore, PromptStore, RedisStore
from server.auth import DEFAULT_TENANT, ApiKeys
from server.batcher import MixedTaskBatcher
from server.inference import InferenceService
from server.jobs.service import TrainingService, build_training
from server.metrics import BatcherMetrics, ServerMetrics
from server.model import FrozenT5
from server.prompt_service import PromptService
from server.registry import PromptRegistry, TaskKey
from server.registry_sync import RegistrySync
from server.runner import BatchRunner, Work
from server.settings import Settings

log = logging.getLogger(__name__)

REDIS_CONNECT_WAIT_S = 3.0
DEGRADED = (
    "the prompt registry's Redis is unreachable ({problem}): serving from the prompt cache and the disk mirror; "
    "prompt changes answer 503 until it is back"
)


@dataclass
class Runtime:
    settings: Settings
    model: FrozenT5
    store: PromptStore
    registry: PromptRegistry
    batcher: MixedTaskBatcher[Work]
    inference: InferenceService
    training: TrainingService
    prompts: PromptService
    sync: RegistrySync | None = None

    def degraded(self) -> str | None:
        """Why this replica is serving with reduced function, or None when it is not."""
        if self.sync is not None and not self.sync.healthy:
            return DEGRADED.format(problem=self.sync.problem)
        return None

    async def stop(self) -> None:
        await self.training.stop()  # first: the in-process worker may be registering a prompt
        await self.batcher.stop()
        if self.sync is not None:
            await self.sync.stop()
        await self.registry.stop()
        if isinstance(self.store, RedisStore):
            self.store.close()


def open_store(settings: Settings) -> PromptStore:
    """The disk store; or Redis written through to the disk store as its durable mirror."""
    disk = DiskStore(settings.data_dir / "prompts")
    if settings.store == "redis":
        return RedisStore(settings.redis_url, disk, settings.redis_namespace, settings.redis_timeout_s)
    return disk


def preload_task_keys(settings: Settings) -> list[TaskKey]:
    """`preload_tasks` entries (`tenant/task`, or `task` of the default tenant) as (tenant, task_id)."""
    pairs = [name.partition("/") for name in settings.preload_tasks]
    return [(tenant, task_id) if sep else (DEFAULT_TENANT, tenant) for tenant, sep, task_id in pairs]


async def start_batcher(settings: Settings, model: FrozenT5, metrics: ServerMetrics) -> MixedTaskBatcher[Work]:
    batcher: MixedTaskBatcher[Work] = MixedTaskBatcher(
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


async def build_runtime(settings: Settings, metrics: ServerMetrics, model: FrozenT5 | None = None) -> Runtime:
    if model is None:
        model = await asyncio.to_thread(FrozenT5.load, settings.model, settings.device, settings.dtype)
    model.use_cpu_threads(settings.cpu_threads)
    store = open_store(settings)
    registry = PromptRegistry(
        store,
        model.prompt_on_device,
        int(settings.prompt_cache_mb * 1024 * 1024),
        metrics,
        source=settings.store,
        pinned=preload_task_keys(settings),
    )
    sync = None
    if isinstance(store, RedisStore):
        sync = RegistrySync(store, registry, metrics, settings.registry_reconcile_s)
        await sync.start(wait_s=REDIS_CONNECT_WAIT_S)
    try:
        await registry.preload()
        batcher = await start_batcher(settings, model, metrics)
    except BaseException:
        if sync is not None:
            await sync.stop()
        raise
    inference = InferenceService(model, registry, batcher, settings)
    training = build_training(settings, model, registry, metrics.training)
    await training.start()
    prompts = PromptService(model, registry, settings)
    return Runtime(settings, model, store, registry, batcher, inference, training, prompts, sync)


@dataclass
class Lifecycle:
    """What `/ready` reports, and the runtime once it exists."""

    settings: Settings
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    phase: str = "starting"  # starting | ready | draining | failed
    reason: str = ""
    runtime: Runtime | None = None
    api_keys: ApiKeys = field(init=False)

    def __post_init__(self) -> None:
        self.api_keys = ApiKeys(self.settings.keys_file, self.settings.auth)

    async def start(self, model: FrozenT5 | None) -> None:
        try:
            self.runtime = await build_runtime(self.settings, self.metrics, model)
            if self.phase == "starting":  # a SIGTERM during start-up keeps it draining
                self.phase = "ready"
            log.info("ready: model %s on %s", self.runtime.model.model_id, self.runtime.model.device)
        except Exception as error:
            log.exception("start-up failed")
            self.phase, self.reason = "failed", f"{type(error).__name__}: {error}"

    async def stop(self) -> None:
        self.phase = "draining"
        if self.runtime is not None:
            await self.runtime.stop()
