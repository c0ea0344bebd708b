"""`/v1/generate` and `/v1/classify`."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from functools import lru_cache
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.routing import APIRoute

from server.api.deps import caller, components, wait_for_disconnect
from server.api.errors import documented_errors
from server.components import Components
from server.serving.schemas import ClassifyRequest, ClassifyResponse, GenerateRequest, GenerateResponse
from server.tenancy.keys import Caller

OVERLOADED = "overloaded"


class ShedWhenFull(APIRoute):
    """Answers 503 before the body is read, parsed or validated when the queue has no room for even one row.

    A flood of requests that would all be refused then costs almost nothing, and the requests already
    accepted keep the server's time. Any request that could fit goes on to the full checks (and a request
    that can never be served gets its 422 there, once the queue has room).
    """

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def shed_or_handle(request: Request) -> Response:
            return _shed(request) or await handler(request)

        return shed_or_handle


def _shed(request: Request) -> Response | None:
    lifecycle = request.app.state.lifecycle
    rt: Components | None = lifecycle.components
    if rt is None or not rt.batcher.is_full:
        return None
    lifecycle.metrics.rejections.labels(reason=OVERLOADED).inc()
    error = rt.batcher.queue_full()
    headers = {"Retry-After": str(max(1, round(error.retry_after_s)))}
    return Response(_overloaded_body(str(error)), 503, headers, media_type="application/json")


@lru_cache(maxsize=4)
def _overloaded_body(message: str) -> bytes:
    """The same bytes for every shed request: serialised once."""
    return json.dumps({"error": {"code": OVERLOADED, "message": message}}).encode()


router = APIRouter(
    prefix="/v1",
    tags=["inference"],
    route_class=ShedWhenFull,
    responses=documented_errors(400, 401, 403, 404, 413, 422, 429, 500, 503, 504),
)


@router.post("/generate", response_model=GenerateResponse)
async def generate(
    body: GenerateRequest,
    request: Request,
    who: Annotated[Caller, Depends(caller)],
    rt: Annotated[Components, Depends(components)],
) -> GenerateResponse:
    return await rt.inference.generate(who.tenant, body, lambda: wait_for_disconnect(request))


@router.post("/classify", response_model=ClassifyResponse)
async def classify(
    body: ClassifyRequest,
    request: Request,
    who: Annotated[Caller, Depends(caller)],
    rt: Annotated[Components, Depends(components)],
) -> ClassifyResponse:
    return await rt.inference.classify(who.tenant, body, lambda: wait_for_disconnect(request))
