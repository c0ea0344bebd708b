"""The serving components and their life cycle: built once at start-up, kept on `app.state`."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from prompt_store import DiskStore, PromptStore
from server.auth import ApiKeys
from server.batcher import MixedTaskBatcher
from server.inference import InferenceService
from server.metrics import BatcherMetrics, ServerMetrics
from server.model import FrozenT5
from server.registry import PromptRegistry
from server.runner import BatchRunner, Work
from server.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    model: FrozenT5
    store: PromptStore
    registry: PromptRegistry
    batcher: MixedTaskBatcher[Work]
    inference: InferenceService

    async def stop(self) -> None:
        await self.batcher.stop()


def open_store(settings: Settings) -> PromptStore:
    if settings.store == "redis":
        raise NotImplementedError("the Redis store is not available in this build; use store=disk")
    return DiskStore(settings.data_dir / "prompts")


async def build_runtime(settings: Settings, metrics: ServerMetrics, model: FrozenT5 | None = None) -> Runtime:
    if model is None:
        model = await asyncio.to_thread(FrozenT5.load, settings.model, settings.device, settings.dtype)
    store = open_store(settings)
    registry = PromptRegistry(
        store, model.prompt_on_device, int(settings.prompt_cache_mb * 1024 * 1024), metrics, source=settings.store
    )
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
    return Runtime(settings, model, store, registry, batcher, InferenceService(model, registry, batcher, settings))


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
        self.api_keys = ApiKeys(self.settings.keys_file)

    async def start(self, model: FrozenT5 | None) -> None:
        try:
            self.runtime = await build_runtime(self.settings, self.metrics, model)
            self.phase = "ready"
            log.info("ready: model %s on %s", self.runtime.model.model_id, self.runtime.model.device)
        except Exception as error:
            log.exception("start-up failed")
            self.phase, self.reason = "failed", f"{type(error).__name__}: {error}"

    async def stop(self) -> None:
        self.phase = "draining"
        if self.runtime is not None:
            await self.runtime.stop()
