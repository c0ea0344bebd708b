"""The HTTP API (docs/api.md): routes, error mapping and dependencies. The only FastAPI-aware package."""

from fastapi import APIRouter

from server.api import inference, openai, operations, prompts, training

api_router = APIRouter()
for module in (inference, openai, prompts, training, operations):
    api_router.include_router(module.router)

# The routes that put rows in the queue: shed before their body is read while it is full.
queueing_routes = [*inference.router.routes, *openai.generation_router.routes]

__all__ = ["api_router", "queueing_routes"]
