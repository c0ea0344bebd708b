"""`/v1/training-jobs`: submit (JSON, or multipart with JSONL files), read, list, cancel.

The route hands the body's bytes, or the form's parts, to `TrainingService`, which parses them off the event
loop (`server.jobs.submission`): a large upload takes seconds of CPU, which must never stall the loop.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Request
from pydantic import BaseModel
from starlette.datastructures import UploadFile

from prompt_store import TASK_ID_PATTERN
from server.api.deps import caller, components, management_budget
from server.api.errors import documented_errors
from server.components import Components
from server.jobs.schemas import JobAccepted, JobList, JobView, TrainingJobRequest
from server.jobs.service import TrainingService
from server.jobs.submission import Submission
from server.tenancy.keys import Caller

router = APIRouter(
    prefix="/v1/training-jobs",
    tags=["training"],
    dependencies=[Depends(management_budget)],
    responses=documented_errors(400, 401, 403, 404, 409, 413, 415, 422, 429, 503),
)

Who = Annotated[Caller, Depends(caller)]
Rt = Annotated[Components, Depends(components)]


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its `$defs` resolved in place (a request body schema stands alone)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    return resolve(schema)


JSONL_FILE = {"type": "string", "format": "binary", "description": 'JSONL: one {"input": ..., "target": ...} per line'}
REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": inline_schema(TrainingJobRequest)},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["task_id", "train"],
                    "properties": {
                        "task_id": {"type": "string", "pattern": TASK_ID_PATTERN},
                        "train": JSONL_FILE,
                        "eval": JSONL_FILE,
                        "config": {"type": "string", "description": "the job's config as a JSON object"},
                        "activate": {"type": "boolean", "default": True},
                    },
                }
            },
        },
    }
}


async def form_parts(request: Request) -> dict[str, str | bytes]:
    """The form's fields as text, its files as bytes (a field sent twice: the last one)."""
    async with request.form() as form:
        return {name: await _value(form[name]) for name in form}


async def _value(part: str | UploadFile) -> str | bytes:
    return await part.read() if isinstance(part, UploadFile) else part


async def read_submission(request: Request, training: TrainingService) -> Submission:
    content_type = request.headers.get("content-type", "application/json")
    if content_type.startswith("multipart/form-data"):
        return await training.submission_from_form(await form_parts(request))
    if content_type.startswith("application/json"):
        return await training.submission_from_json(await request.body())
    raise HTTPException(415, "send the job as application/json or as multipart/form-data")


@router.post("", status_code=202, response_model=JobAccepted, openapi_extra=REQUEST_BODY)
async def submit_job(request: Request, who: Who, rt: Rt) -> JobAccepted:
    record = await rt.training.submit(who.tenant, await read_submission(request, rt.training))
    return JobAccepted(job_id=record.job_id, state=record.state)


@router.get("", response_model=JobList)
async def list_jobs(who: Who, rt: Rt) -> JobList:
    return JobList(jobs=[JobView.of(record) for record in await rt.training.tenant_jobs(who.tenant)])


JobId = Annotated[str, Path(max_length=64, description="a job id (32 hex digits)")]


@router.get("/{job_id}", response_model=JobView)
async def get_job(job_id: JobId, who: Who, rt: Rt) -> JobView:
    return JobView.of(await rt.training.get(who.tenant, job_id))


@router.delete("/{job_id}", response_model=JobView)
async def cancel_job(job_id: JobId, who: Who, rt: Rt) -> JobView:
    """Cancels a queued or running job (409 once it has ended or is registering its prompt)."""
    return JobView.of(await rt.training.cancel(who.tenant, job_id))
