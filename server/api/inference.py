"""`/v1/generate` and `/v1/classify`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from server.api.deps import caller, runtime
from server.auth import Caller
from server.runtime import Runtime
from server.schemas import ClassifyRequest, ClassifyResponse, GenerateRequest, GenerateResponse

router = APIRouter(prefix="/v1", tags=["inference"])


@router.post("/generate", response_model=GenerateResponse)
async def generate(
    body: GenerateRequest, who: Annotated[Caller, Depends(caller)], rt: Annotated[Runtime, Depends(runtime)]
) -> GenerateResponse:
    return await rt.inference.generate(who.tenant, body)


@router.post("/classify", response_model=ClassifyResponse)
async def classify(
    body: ClassifyRequest, who: Annotated[Caller, Depends(caller)], rt: Annotated[Runtime, Depends(runtime)]
) -> ClassifyResponse:
    return await rt.inference.classify(who.tenant, body)
