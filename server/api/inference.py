"""`/v1/generate` and `/v1/classify`."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.api.deps import caller, components, wait_for_disconnect
from server.api.errors import ERROR_STATUSES, REJECTION_REASONS, documented_errors, error_envelope, error_param
from server.components import Components
from server.serving.schemas import ClassifyRequest, ClassifyResponse, GenerateRequest, GenerateResponse
from server.serving.service import InferenceService, Streaming
from server.tenancy.keys import Caller

log = logging.getLogger(__name__)

router = APIRouter(
    prefix="/v1",
    tags=["inference"],
    responses=documented_errors(400, 401, 403, 404, 413, 422, 429, 500, 503, 504),
)


STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy holds tokens back
STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the outputs; with `stream: true`, server-sent events instead: one per token "
        "(`data: {index, token: {id, text}}`, with `logprobs` when asked), then `event: end` (or `event: error` "
        "with the error body)",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
}


@router.post(
    "/generate", response_model=GenerateResponse, response_model_exclude_none=True, responses=STREAM_RESPONSE
)  # an ensemble's fields only where it ran
async def generate(
    body: GenerateRequest,
    request: Request,
    who: Annotated[Caller, Depends(caller)],
    rt: Annotated[Components, Depends(components)],
) -> GenerateResponse | Response:
    if body.stream:  # refusals come before the first byte: plain JSON errors, as for any request
        version, stream = await rt.inference.generate_stream(who.tenant, body)
        return EventStream(generate_events(request, body.task_id, version, stream, rt.inference))
    return await rt.inference.generate(who.tenant, body, lambda: wait_for_disconnect(request))


class EventStream(StreamingResponse):
    """`text/event-stream` whose events are closed however the response ends.

    When the client leaves, Starlette cancels the sending, which may be waiting in `send` with the event source
    paused at a `yield`: only closing the source then stops it, and with it the engine row it streams.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[str, None]) -> None:
        super().__init__(events, headers=STREAM_HEADERS)
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.events.aclose()


async def generate_events(
    request: Request, task_id: str, version: int, stream: Streaming, inference: InferenceService
) -> AsyncGenerator[str, None]:
    """One event per token, then `end` with the whole generation; an error once the stream has begun (the
    status line is sent) becomes an `error` event with the API's error body."""
    try:
        async with aclosing(aiter(stream)) as tokens:  # stopping early closes the row's stream: the row leaves
            async for token in tokens:
                event: dict[str, Any] = {"index": token.index, "token": {"id": token.token_id, "text": token.text}}
                if token.logprobs is not None:
                    (entry,) = inference.token_logprobs([token.token_id], [token.logprobs])
                    event["logprobs"] = entry.model_dump()
                yield server_event(event)
    except Exception as error:
        yield server_event(error_body(request, error), "error")
        return
    result = stream.result
    assert result is not None  # set when the tokens end without an error
    end = {
        "task_id": task_id,
        "prompt_version": version,
        "finish_reason": result.finish_reason,
        "text": result.text,
        "num_tokens": len(result.token_ids),
    }
    yield server_event(end, "end")


def server_event(data: dict[str, Any], name: str | None = None) -> str:
    """One server-sent event; JSON escapes line breaks, so `data` is one line."""
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


ERROR_CODES = {exc_type: (status, code) for exc_type, status, code in ERROR_STATUSES}


def error_body(request: Request, error: Exception) -> dict[str, Any]:
    """The body the error handlers would have answered (the most specific class in the table decides), counted
    as they count it."""
    known = next((ERROR_CODES[cls] for cls in type(error).__mro__ if cls in ERROR_CODES), None)
    if known is None:
        log.exception("unhandled error while streaming %s", request.url.path, exc_info=error)
        return error_envelope(500, "internal_error", "internal server error; the details are in the server log")
    status, code = known
    if code in REJECTION_REASONS:
        request.app.state.lifecycle.metrics.rejections.labels(reason=code).inc()
    return error_envelope(status, code, str(error), error_param(error))


@router.post("/classify", response_model=ClassifyResponse, response_model_exclude_none=True)
async def classify(
    body: ClassifyRequest,
    request: Request,
    who: Annotated[Caller, Depends(caller)],
    rt: Annotated[Components, Depends(components)],
) -> ClassifyResponse:
    return await rt.inference.classify(who.tenant, body, lambda: wait_for_disconnect(request))
