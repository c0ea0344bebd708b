"""The app factory: builds the FastAPI app, its middleware and the components' life cycle."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType

import uvicorn
from fastapi import FastAPI

from server.api import api_router
from server.api.errors import install_error_handlers
from server.connections import ConnectionLimits, GuardedH11Protocol
from server.middleware import BodySizeLimit, RequestMetrics, StrictJSONBody
from server.model import FrozenT5
from server.runtime import Lifecycle
from server.settings import Settings


def create_app(settings: Settings | None = None, model: FrozenT5 | None = None) -> FastAPI:
    """`model` lets a caller share one loaded model between apps (tests, benchmarks)."""
    settings = settings or Settings()
    lifecycle = Lifecycle(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Start in the background so /health and /ready answer while the model loads.
        starting = asyncio.create_task(lifecycle.start(model))
        yield
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await lifecycle.stop()

    app = FastAPI(
        title="softserve",
        version="0.1.0",
        summary="Many soft prompts over one frozen T5, batched across tasks",
        lifespan=lifespan,
    )
    lifecycle.api_keys.check()  # an unusable keys file stops start-up (fail closed)
    app.state.lifecycle = lifecycle
    install_error_handlers(app)
    app.include_router(api_router)
    app.add_middleware(StrictJSONBody)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=lifecycle.metrics)
    return app


log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: `/ready` turns 503 at once, new work is still taken for `drain_delay_s` (so load
    balancers see it), then uvicorn stops accepting and lets in-flight requests finish (`drain_timeout_s`)."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, drain_delay_s: float) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.drain_delay_s = drain_delay_s

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.lifecycle.phase == "draining":  # a second signal: stop now
            super().handle_exit(sig, frame)
            return
        log.info("draining: /ready answers 503; closing in %.1f s", self.drain_delay_s)
        self.lifecycle.phase = "draining"
        threading.Timer(self.drain_delay_s, super().handle_exit, (sig, frame)).start()


def serve(settings: Settings) -> None:
    """Raises `KeysFileError` before anything starts when the API keys file is unusable."""
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        http=functools.partial(GuardedH11Protocol, limits=ConnectionLimits.of(settings)),  # type: ignore[arg-type]
        ws="none",
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]
        timeout_graceful_shutdown=settings.drain_timeout_s,
    )
    DrainingServer(config, app.state.lifecycle, settings.drain_delay_s).run()
