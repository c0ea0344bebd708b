"""The HTTP API (docs/api.md): routes, error mapping and dependencies. The only FastAPI-aware package."""

from starlette.routing import BaseRoute

from server.api import inference, openai, operations, prompts, training

# Every route, in the order they are matched. The app holds them itself: FastAPI (from 0.13x) walks every level of
# included routers on each request to see whether its routes changed, and three levels cost the API process 7% of
# its CPU under load. Each route already carries its router's prefix, tags, dependencies and responses.
api_routes: list[BaseRoute] = [
    *inference.router.routes,
    *openai.models_router.routes,
    *openai.generation_router.routes,
    *prompts.router.routes,
    *training.router.routes,
    *operations.router.routes,
]

# The routes that put rows in the queue: shed before their body is read while it is full.
queueing_routes = [*inference.router.routes, *openai.generation_router.routes]

__all__ = ["api_routes", "queueing_routes"]
