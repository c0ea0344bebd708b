"""`/v1/generate` and `/v1/classify`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from server.api.deps import caller, runtime, wait_for_disconnect
from server.api.errors import documented_errors
from server.auth import Caller
from server.runtime import Runtime
from server.schemas import ClassifyRequest, ClassifyResponse, GenerateRequest, GenerateResponse

router = APIRouter(
    prefix="/v1", tags=["inference"], responses=documented_errors(400, 401, 403, 404, 413, 422, 429, 500, 503, 504)
)


@router.post("/generate", response_model=GenerateResponse)
async def generate(
    body: GenerateRequest,
    request: Request,
    who: Annotated[Caller, Depends(caller)],
    rt: Annotated[Runtime, Depends(runtime)],
) -> GenerateResponse:
    return await rt.inference.generate(who.tenant, body, lambda: wait_for_disconnect(request))


@router.post("/classify", response_model=ClassifyResponse)
async def classify(
    body: ClassifyRequest,
    request: Request,
    who: Annotated[Caller, Depends(caller)],
    rt: Annotated[Runtime, Depends(runtime)],
) -> ClassifyResponse:
    return await rt.inference.classify(who.tenant, body, lambda: wait_for_disconnect(request))
