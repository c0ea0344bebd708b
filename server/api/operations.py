"""`/health`, `/ready`, `/metrics`, `/v1/info`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from server.api.deps import admin, caller, components, management_budget
from server.api.errors import documented_errors
from server.components import Components
from server.tenancy.keys import Caller

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "starting, draining, failed, or the engine is down"}})
async def ready(request: Request) -> JSONResponse:
    """200 "ready"; 200 "degraded" while Redis is down (this replica still serves from its cache and the
    disk mirror, so a load balancer must keep it: 503 on every replica at once would turn a Redis outage
    into a full one); 503 while starting, draining or failed, and while the engine is down (it is restarted;
    its rows in flight got 503)."""
    lifecycle = request.app.state.lifecycle
    phase, reason = lifecycle.phase, lifecycle.reason
    components = lifecycle.components if phase == "ready" else None
    engine_down = components.engine_down() if components is not None else None
    degraded = components.degraded() if components is not None else None
    if engine_down:
        phase, reason = "engine_down", engine_down
    elif degraded:
        phase, reason = "degraded", degraded
    body: dict[str, Any] = {"status": phase}
    if reason:
        body["reason"] = reason
    status = 200 if phase in ("ready", "degraded") else 503
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse(body, status_code=status, headers=headers)


@router.get("/metrics", response_class=Response, responses=documented_errors(401, 403))
async def metrics(request: Request) -> Response:
    lifecycle = request.app.state.lifecycle
    if lifecycle.settings.metrics_require_key:
        await admin(request)
    return Response(lifecycle.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/info", dependencies=[Depends(management_budget)], responses=documented_errors(401, 403, 429, 503))
async def info(
    who: Annotated[Caller, Depends(caller)], rt: Annotated[Components, Depends(components)]
) -> dict[str, Any]:
    s = rt.settings
    return {
        "model": rt.model.model_id,
        "d_model": rt.model.d_model,
        "dtype": str(rt.model.dtype).removeprefix("torch."),
        "device": str(rt.model.device),
        "store": s.store,
        "tenant": who.tenant,
        "limits": {
            "max_batch_size": s.max_batch_size,
            "max_batch_tokens": s.max_batch_tokens,
            "max_wait_ms": s.max_wait_ms,
            "max_queue_size": s.max_queue_size,
            "max_prompt_length": s.max_prompt_length,
            "max_input_tokens": s.max_input_tokens,
            "max_new_tokens": s.max_new_tokens,
            "max_inputs_per_request": s.max_inputs_per_request,
            "max_body_bytes": s.max_body_bytes,
            "request_timeout_s": s.request_timeout_s,
        },
    }
