"""OpenAI-compatible routes (a task is a model): `/v1/models`, `/v1/completions`, `/v1/chat/completions`."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request, Response

from server.api.deps import PageCursor, PageLimit, caller, components, management_budget, wait_for_disconnect
from server.api.errors import documented_errors
from server.api.inference import EventStream, error_body, server_event
from server.components import Components
from server.registry.listing import DEFAULT_PAGE_SIZE
from server.serving.openai_compat import OpenAIService
from server.serving.openai_schemas import (
    MAX_MODEL_CHARS,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    EmbeddingList,
    EmbeddingRequest,
    ModelCard,
    ModelList,
)
from server.tenancy.keys import Caller

ERRORS = documented_errors(400, 401, 403, 404, 413, 422, 429, 500, 503, 504)
models_router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(management_budget)], responses=ERRORS)
# Like `/v1/generate`: answered 503 before the body is read while the queue has no room (`server.api.shedding`).
generation_router = APIRouter(prefix="/v1", tags=["openai"], responses=ERRORS)

Who = Annotated[Caller, Depends(caller)]


async def openai_service(rt: Annotated[Components, Depends(components)]) -> OpenAIService:
    return OpenAIService(rt.inference)


Service = Annotated[OpenAIService, Depends(openai_service)]

CHUNK_STREAM: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "with `stream: true`, server-sent events instead: one `data: {chunk}` per piece of text, "
        "a usage chunk with `stream_options.include_usage`, then `data: [DONE]` (or a last `data:` with the error "
        "body)",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
}


@models_router.get("/models", response_model=ModelList)
async def list_models(
    who: Who,
    service: Service,
    rt: Annotated[Components, Depends(components)],
    limit: PageLimit = DEFAULT_PAGE_SIZE,
    cursor: PageCursor = None,
) -> ModelList:
    """One page of the tenant's models (tasks) by id; follow `next_cursor` until it is null for the rest."""
    models = await service.models(who.tenant, cursor, limit)
    await rt.management.spend(who.tenant, len(models.data))
    return models


@models_router.get("/models/{model}", response_model=ModelCard)
async def retrieve_model(
    model: Annotated[str, Path(max_length=MAX_MODEL_CHARS)], who: Who, service: Service
) -> ModelCard:
    return await service.model(who.tenant, model)


@generation_router.post("/completions", response_model=Completion, responses=CHUNK_STREAM)
async def create_completion(
    body: CompletionRequest, request: Request, who: Who, service: Service
) -> Completion | Response:
    if body.stream:  # refusals come before the first byte: plain JSON errors
        return EventStream(chunk_events(request, await service.stream_completion(who.tenant, body)))
    return await service.complete(who.tenant, body, lambda: wait_for_disconnect(request))


@generation_router.post("/chat/completions", response_model=ChatCompletion, responses=CHUNK_STREAM)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, who: Who, service: Service
) -> ChatCompletion | Response:
    if body.stream:
        return EventStream(chunk_events(request, await service.stream_chat(who.tenant, body)))
    return await service.complete_chat(who.tenant, body, lambda: wait_for_disconnect(request))


@generation_router.post("/embeddings", response_model=EmbeddingList)
async def create_embeddings(body: EmbeddingRequest, request: Request, who: Who, service: Service) -> EmbeddingList:
    """Each input's embedding with the task's soft prompt: the encoder's output averaged over the input's tokens."""
    return await service.embed(who.tenant, body, lambda: wait_for_disconnect(request))


async def chunk_events(request: Request, chunks: AsyncGenerator[dict[str, Any], None]) -> AsyncGenerator[str, None]:
    """OpenAI's stream: `data: {chunk}` each, then `data: [DONE]`. An error once the stream has begun is a last
    `data:` holding the API's error body, as OpenAI sends one (and no `[DONE]`: the stream did not complete)."""
    try:
        async with aclosing(chunks) as items:  # stopping early closes the rows' streams: the rows leave
            async for chunk in items:
                yield server_event(chunk)
    except Exception as error:
        yield server_event(error_body(request, error))
        return
    yield "data: [DONE]\n\n"
