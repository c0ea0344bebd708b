"""Small dependency functions: routes reach the components kept on `app.state`."""

from __future__ import annotations

from fastapi import Request

from server.auth import Caller
from server.errors import NotReady
from server.runtime import Runtime


def runtime(request: Request) -> Runtime:
    state = request.app.state.lifecycle
    if state.runtime is None:
        raise NotReady(f"the server is not ready ({state.phase})")
    return state.runtime


def caller(request: Request) -> Caller:
    return request.app.state.lifecycle.api_keys.authenticate(request.headers.get("authorization"))


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
