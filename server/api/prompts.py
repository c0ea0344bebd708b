"""`/v1/prompts...`: upload, list, read, download, activate, ensemble, pin, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Path, Query, Request, Response, UploadFile

from prompt_store import TASK_ID_PATTERN, PromptFormat
from server.api.deps import PageCursor, PageLimit, caller, components, management_budget
from server.api.errors import documented_errors
from server.components import Components
from server.errors import InvalidInput
from server.registry.explain import MAX_NEIGHBOURS
from server.registry.listing import DEFAULT_PAGE_SIZE
from server.registry.schemas import (
    ActivateRequest,
    EnsembleRequest,
    NearestTokens,
    PromptList,
    PromptSummary,
    SimilarTasks,
    TaskView,
    UploadResponse,
)
from server.tenancy.keys import Caller

router = APIRouter(
    prefix="/v1/prompts",
    tags=["prompts"],
    dependencies=[Depends(management_budget)],
    responses=documented_errors(400, 401, 403, 404, 413, 415, 422, 429, 503),
)

TaskId = Annotated[str, Path(pattern=TASK_ID_PATTERN)]
Who = Annotated[Caller, Depends(caller)]
Rt = Annotated[Components, Depends(components)]

MEDIA_TYPES = {
    PromptFormat.SAFETENSORS: ("application/octet-stream", "safetensors"),
    PromptFormat.NPY: ("application/octet-stream", "npy"),
    PromptFormat.PEFT: ("application/zip", "zip"),
}


UPLOAD_PARTS = ("file", "metadata")
MAX_METADATA_CHARS = 1 << 20  # what the form parser takes of a field at most (1 MiB)


async def one_of_each_part(request: Request) -> None:
    """A form with two `file` parts would keep only the last one; ambiguity and unknown parts are refused."""
    names = [name for name, _ in (await request.form()).multi_items()]
    unknown = sorted(set(names) - set(UPLOAD_PARTS))
    if unknown:
        raise InvalidInput(f"unknown form fields {unknown}; an upload has the parts {list(UPLOAD_PARTS)}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InvalidInput(f"the form has more than one {repeated[0]!r} part; send each part once")


@router.put("/{task_id}", status_code=201, response_model=UploadResponse, dependencies=[Depends(one_of_each_part)])
async def upload_prompt(
    task_id: TaskId,
    who: Who,
    rt: Rt,
    file: Annotated[UploadFile, File(description="safetensors, .npy, or a PEFT adapter (zip/tar)")],
    metadata: Annotated[
        str | None, Form(max_length=MAX_METADATA_CHARS, description="JSON: labels, description, input_template, ...")
    ] = None,
) -> UploadResponse:
    meta = rt.prompts.parse_metadata(metadata)
    return UploadResponse.of(await rt.prompts.upload(who.tenant, task_id, file.file, meta))


@router.get("", response_model=PromptList)
async def list_prompts(who: Who, rt: Rt, limit: PageLimit = DEFAULT_PAGE_SIZE, cursor: PageCursor = None) -> PromptList:
    """One page of the tenant's tasks by task id; follow `next_cursor` until it is null for the rest."""
    page = await rt.prompts.task_page(who.tenant, cursor, limit)
    await rt.management.spend(who.tenant, len(page.records))
    prompts = [rt.prompts.summary(r) for r in page.records]
    return PromptList(prompts=prompts, has_more=page.has_more, next_cursor=page.next_cursor)


@router.get("/{task_id}", response_model=TaskView)
async def get_prompt(task_id: TaskId, who: Who, rt: Rt) -> TaskView:
    return TaskView.of(await rt.prompts.task(who.tenant, task_id))


@router.get("/{task_id}/versions/{version}", response_class=Response)
async def download_prompt(
    task_id: TaskId,
    version: Annotated[int, Path(ge=1)],
    who: Who,
    rt: Rt,
    format: Annotated[PromptFormat, Query()] = PromptFormat.SAFETENSORS,
) -> Response:
    data = await rt.prompts.download(who.tenant, task_id, version, format)
    media_type, extension = MEDIA_TYPES[format]
    filename = f"{task_id}-v{version}.{extension}"
    return Response(data, media_type=media_type, headers={"Content-Disposition": f'attachment; filename="{filename}"'})


Neighbours = Annotated[int, Query(ge=1, le=MAX_NEIGHBOURS, description="how many to return")]


@router.get("/{task_id}/versions/{version}/nearest-tokens", response_model=NearestTokens)
async def nearest_tokens(
    task_id: TaskId, version: Annotated[int, Path(ge=1)], who: Who, rt: Rt, k: Neighbours = 5
) -> NearestTokens:
    return await rt.prompts.explain.nearest_tokens(who.tenant, task_id, version, k)


@router.get("/{task_id}/similar", response_model=SimilarTasks)
async def similar_tasks(task_id: TaskId, who: Who, rt: Rt, k: Neighbours = 5) -> SimilarTasks:
    similar = await rt.prompts.explain.similar_tasks(who.tenant, task_id, k)
    await rt.management.spend(who.tenant, similar.compared)
    return similar


@router.post("/{task_id}/activate", response_model=TaskView)
async def activate_prompt(task_id: TaskId, body: ActivateRequest, who: Who, rt: Rt) -> TaskView:
    return TaskView.of(await rt.prompts.activate(who.tenant, task_id, body.version))


@router.put("/{task_id}/ensemble", response_model=TaskView)
async def set_ensemble(task_id: TaskId, body: EnsembleRequest, who: Who, rt: Rt) -> TaskView:
    return TaskView.of(await rt.prompts.set_ensemble(who.tenant, task_id, body.versions))


@router.delete("/{task_id}/ensemble", response_model=TaskView)
async def clear_ensemble(task_id: TaskId, who: Who, rt: Rt) -> TaskView:
    return TaskView.of(await rt.prompts.set_ensemble(who.tenant, task_id, []))


@router.put("/{task_id}/pin", response_model=PromptSummary)
async def pin_prompt(task_id: TaskId, who: Who, rt: Rt) -> PromptSummary:
    """Keeps the task's active prompt (whichever version is active) on the device of every replica, never evicted:
    within the tenant's `max_pinned_per_tenant` (429) and the prompt cache's budget (422)."""
    return await rt.prompts.pin(who.tenant, task_id)


@router.delete("/{task_id}/pin", response_model=PromptSummary)
async def unpin_prompt(task_id: TaskId, who: Who, rt: Rt) -> PromptSummary:
    """The task's prompt becomes evictable again (it stays loaded until the cache needs the room)."""
    return await rt.prompts.unpin(who.tenant, task_id)


@router.delete("/{task_id}", status_code=204, response_class=Response)
async def delete_prompt(task_id: TaskId, who: Who, rt: Rt) -> Response:
    await rt.prompts.delete(who.tenant, task_id)
    return Response(status_code=204)
