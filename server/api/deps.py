"""Small dependency functions: routes reach the components kept on `app.state`."""

from __future__ import annotations

from fastapi import Request

from prompt_store import is_valid_task_id
from server.components import Components
from server.errors import Forbidden, InvalidInput, NotReady
from server.tenancy.keys import Caller


def components(request: Request) -> Components:
    state = request.app.state.lifecycle
    if state.components is None:
        raise NotReady(f"the server is not ready ({state.phase})")
    return state.components


ACT_AS_HEADER = "x-softserve-tenant"


def caller(request: Request) -> Caller:
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


def admin(request: Request) -> Caller:
    who = caller(request)
    if not who.admin:
        raise Forbidden("this route needs an admin key")
    return who


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
