"""The HTTP API (docs/api.md): routes, error mapping and dependencies. The only FastAPI-aware package."""

from fastapi import APIRouter

from server.api import inference, openai, operations, prompts, training

api_router = APIRouter()
for module in (inference, openai, prompts, training, operations):
    api_router.include_router(module.router)

__all__ = ["api_router"]
