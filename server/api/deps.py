"""Small dependency functions: routes reach the components kept on `app.state`.

They are `async def` though none of them waits: FastAPI runs a plain `def` dependency on a worker thread, and that
hop costs more CPU than the function itself (the keys file's `stat` is the only system call among them)."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import Depends, Query, Request

from prompt_store import is_valid_task_id
from server.components import Components
from server.errors import Forbidden, InvalidInput, NotReady, RateLimited
from server.registry.listing import MAX_CURSOR_CHARS, MAX_PAGE_SIZE
from server.tenancy.keys import Caller


async def components(request: Request) -> Components:
    state = request.app.state.lifecycle
    if state.components is None:
        raise NotReady(f"the server is not ready ({state.phase})")
    return state.components


ACT_AS_HEADER = "x-softserve-tenant"


async def caller(request: Request) -> Caller:
    """The tenant is decided by the key; an admin key may act for another tenant with a header. An anonymous
    caller of an open server is never an admin, so the header always needs a real admin key."""
    who = request.app.state.lifecycle.api_keys.authenticate(request.headers.get("authorization"))
    act_as = request.headers.get(ACT_AS_HEADER)
    if act_as is None:
        return who
    if not who.admin:
        raise Forbidden(f"only admin keys may send {ACT_AS_HEADER}")
    if not is_valid_task_id(act_as):
        raise InvalidInput(f"{ACT_AS_HEADER} is not a valid tenant name")
    return Caller(act_as, admin=True)


async def admin(request: Request) -> Caller:
    who = await caller(request)
    if not who.admin:
        raise Forbidden("this route needs an admin key")
    return who


async def management_budget(request: Request, who: Annotated[Caller, Depends(caller)]) -> None:
    """Charges the caller's tenant 1 of its management budget (every authenticated route but inference, which has a
    budget of its own; a listing also `spend`s 1 per task it read). A refusal is answered after `shed_delay_ms`, as a
    shed request is: a client looping on 429s then waits instead of taking the server's time from everyone else."""
    rt = await components(request)
    try:
        await rt.management.admit(who.tenant)
    except RateLimited:
        await asyncio.sleep(rt.settings.shed_delay_ms / 1000)
        raise


# The paging parameters of every listing (see `server.registry.listing`).
PageLimit = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description="most items in this page")]
PageCursor = Annotated[
    str | None,
    Query(max_length=MAX_CURSOR_CHARS, description="the `next_cursor` of the previous page (omit for the first)"),
]


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
