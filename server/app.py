"""The app factory: builds the FastAPI app, its middleware and the components' life cycle."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType

import uvicorn
from fastapi import FastAPI

from server.api import api_routes, queueing_routes
from server.api.connections import ConnectionLimits, GuardedH11Protocol
from server.api.docs import install_docs
from server.api.errors import REJECTION_REASONS, install_error_handlers
from server.api.middleware import BodySizeLimit, RequestMetrics, StrictJSONBody
from server.api.shedding import ShedWhenFull
from server.components import Lifecycle, json_body_limit, limits_of
from server.jobs.records import JOB_STATES
from server.metrics import KnownLabels, ServerMetrics
from server.registry.registry import PROMPT_SOURCES
from server.serving.model import FrozenT5
from server.settings import Settings
from server.stopping import cancel_and_wait

# Every labelled metric's series exist at 0 from the start (dashboards and alerts see 0, not "no data").
KNOWN_LABELS = KnownLabels(rejection_reasons=REJECTION_REASONS, prompt_sources=PROMPT_SOURCES, job_states=JOB_STATES)


# The server's metrics are Prometheus's. FastAPI releases with native OpenTelemetry otherwise look up three global
# providers (each an environment read) on every request: 4% of the API process's CPU under load.
NO_OPENTELEMETRY = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI).parameters
    else {}
)


def create_app(settings: Settings | None = None, model: FrozenT5 | None = None) -> FastAPI:
    """`model` lets a caller share one loaded model between apps (tests, benchmarks)."""
    settings = settings or Settings()
    lifecycle = Lifecycle(settings, metrics=ServerMetrics(KNOWN_LABELS))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Start in the background so /health and /ready answer while the model loads.
        starting = asyncio.create_task(lifecycle.start(model))
        yield
        await cancel_and_wait(starting)
        await lifecycle.stop()

    app = FastAPI(
        title="softserve",
        version="0.1.0",
        summary="Many soft prompts over one frozen T5, batched across tasks",
        lifespan=lifespan,
        docs_url=None,  # `install_docs` serves both pages with local assets
        redoc_url=None,
        **NO_OPENTELEMETRY,
    )
    lifecycle.api_keys.check()  # an unusable keys file stops start-up (fail closed)
    app.state.lifecycle = lifecycle
    install_error_handlers(app)
    app.router.routes.extend(api_routes)
    install_docs(app)
    app.add_middleware(StrictJSONBody, max_values=settings.max_json_values)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, max_json_bytes=json_body_limit(settings))
    app.add_middleware(ShedWhenFull, lifecycle=lifecycle, routes=queueing_routes)
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

    async def on_tick(self, counter: int) -> bool:
        """A failed start-up stops the server (`serve` then raises): a process that will never serve must not
        keep answering `/health` with 200."""
        return self.lifecycle.phase == "failed" or await super().on_tick(counter)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.lifecycle.phase in ("draining", "failed"):  # a second signal, or nothing to drain: stop now
            super().handle_exit(sig, frame)
            return
        log.info("draining: /ready answers 503; closing in %.1f s", self.drain_delay_s)
        self.lifecycle.phase = "draining"
        threading.Timer(self.drain_delay_s, super().handle_exit, (sig, frame)).start()


class StartupFailed(Exception):
    """The server stopped because it could not start (the model did not load, ...); the message says why."""


def serve(settings: Settings) -> None:
    """Raises `KeysFileError` before anything starts when the API keys file is unusable, and `StartupFailed`
    once the server has stopped when its components could not start (it answers `/health` while they load)."""
    app = create_app(settings)
    connection_limits = limits_of(settings, ConnectionLimits)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        http=functools.partial(GuardedH11Protocol, limits=connection_limits),  # type: ignore[arg-type]
        ws="none",
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]
        timeout_graceful_shutdown=settings.drain_timeout_s,
    )
    lifecycle: Lifecycle = app.state.lifecycle
    DrainingServer(config, lifecycle, settings.drain_delay_s).run()
    if lifecycle.phase == "failed":
        raise StartupFailed(lifecycle.reason)
