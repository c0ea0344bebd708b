"""`/v1/training-jobs`: submit (JSON, or multipart with JSONL files), read, list, cancel.

A submission's data sets are parsed (and later tokenized) in worker threads through
`TrainingService.off_loop`: a large upload takes seconds of CPU, which must never stall the event loop.
Client JSON is strict (`NaN`/`Infinity` refused), so every number that reaches a job record is finite.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, UploadFile

from prompt_store import TASK_ID_PATTERN
from server import strict_json
from server.api.deps import caller, runtime
from server.api.errors import documented_errors
from server.api.prompts import check_task_quota
from server.auth import Caller
from server.errors import InvalidInput
from server.jobs.dataset import ExampleSet, json_problem, parse_items, parse_jsonl
from server.jobs.errors import InvalidDataset
from server.jobs.schemas import JobAccepted, JobList, JobOptions, JobView, TrainingJobRequest
from server.jobs.service import Submission, TrainingService
from server.runtime import Runtime

router = APIRouter(
    prefix="/v1/training-jobs",
    tags=["training"],
    responses=documented_errors(400, 401, 403, 404, 409, 413, 415, 422, 429, 503),
)

Who = Annotated[Caller, Depends(caller)]
Rt = Annotated[Runtime, Depends(runtime)]

FORM_FIELDS = {"task_id", "train", "eval", "config", "activate"}


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


def _options(raw: dict[str, Any]) -> JobOptions:
    try:
        return JobOptions.model_validate(raw)
    except ValidationError as error:
        raise RequestValidationError(error.errors()) from None


def _from_json(body: bytes, training: TrainingService) -> Submission:
    """Runs in a worker thread (`TrainingService.off_loop`)."""
    try:
        data = strict_json.loads(body)
    except (ValueError, RecursionError) as error:
        problem = {"type": "json_invalid", "loc": ("body",), "msg": f"JSON decode error: {json_problem(error)}"}
        raise RequestValidationError([problem]) from None
    if not isinstance(data, dict):
        raise InvalidInput("the body must be a JSON object (or a multipart form with JSONL files)")
    train, evaluation = data.pop("train", None), data.pop("eval", None)
    options = _options(data)
    training.check_limits(options.config)
    if train is None:
        raise InvalidDataset('train is missing: a list of {"input": ..., "target": ...} objects')
    return Submission(options, parse_items("train", train), parse_items("eval", evaluation) if evaluation else None)


async def _file(form: FormData, name: str, training: TrainingService) -> ExampleSet | None:
    part = form.get(name)
    if part is None:
        return None
    data = await part.read() if isinstance(part, UploadFile) else part.encode()
    return await training.off_loop(parse_jsonl, name, data)


def _config(raw: str | bytes) -> Any:
    try:
        return strict_json.loads(raw)
    except (ValueError, RecursionError) as error:
        raise InvalidInput(f"config is not valid JSON ({json_problem(error)})") from None


async def _from_form(request: Request, training: TrainingService) -> Submission:
    async with request.form() as form:
        unexpected = sorted(set(form.keys()) - FORM_FIELDS)
        if unexpected:
            raise InvalidInput(f"unexpected form field(s): {', '.join(unexpected)}")
        raw: dict[str, Any] = {name: form[name] for name in ("task_id", "activate") if name in form}
        config = form.get("config")
        if config is not None:
            raw["config"] = _config(config if isinstance(config, str) else await config.read())
        options = _options(raw)
        training.check_limits(options.config)
        train = await _file(form, "train", training)
        if train is None:
            raise InvalidDataset("the train file is missing (a JSONL form field named `train`)")
        return Submission(options, train, await _file(form, "eval", training))


async def read_submission(request: Request, training: TrainingService) -> Submission:
    content_type = request.headers.get("content-type", "application/json")
    if content_type.startswith("multipart/form-data"):
        return await _from_form(request, training)
    if content_type.startswith("application/json"):
        return await training.off_loop(_from_json, await request.body(), training)
    raise HTTPException(415, "send the job as application/json or as multipart/form-data")


@router.post("", status_code=202, response_model=JobAccepted, openapi_extra=REQUEST_BODY)
async def submit_job(request: Request, who: Who, rt: Rt) -> JobAccepted:
    submission = await read_submission(request, rt.training)
    await check_task_quota(rt, who.tenant, submission.options.task_id)
    record = await rt.training.submit(who.tenant, submission)
    return JobAccepted(job_id=record.job_id, state=record.state)


@router.get("", response_model=JobList)
async def list_jobs(who: Who, rt: Rt) -> JobList:
    return JobList(jobs=[JobView.of(record) for record in await rt.training.tenant_jobs(who.tenant)])


@router.get("/{job_id}", response_model=JobView)
async def get_job(job_id: str, who: Who, rt: Rt) -> JobView:
    return JobView.of(await rt.training.get(who.tenant, job_id))


@router.delete("/{job_id}", response_model=JobView)
async def cancel_job(job_id: str, who: Who, rt: Rt) -> JobView:
    """Cancels a queued or running job (409 once it has ended or is registering its prompt)."""
    return JobView.of(await rt.training.cancel(who.tenant, job_id))
