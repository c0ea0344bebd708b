"""The app factory: builds the FastAPI app, its middleware and the components' life cycle."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server.api import api_router
from server.api.errors import install_error_handlers
from server.middleware import BodySizeLimit, RequestMetrics
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
    app.state.lifecycle = lifecycle
    install_error_handlers(app)
    app.include_router(api_router)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=lifecycle.metrics)
    return app
