"""Shedding that costs nearly nothing: while the queue has no room for even one row, an inference request is
answered 503 `overloaded` by the outermost middleware but the metrics, before routing, before its body is read,
with messages prepared once.

A flood of requests that would all be refused then takes almost none of the cores the engine needs, and the
requests already accepted keep the server's time. The 503 is sent after `shed_delay_ms`, so a client that retries
at once (a retry storm, or a hostile tenant) sends a few requests a second per connection, not thousands; the
connection stays open, and the unread body is skipped by the HTTP server. Any request that could fit goes on to
the full checks (and a request that can never be served gets its 422 there, once the queue has room).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from functools import lru_cache

from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import error_envelope
from server.components import Lifecycle

OVERLOADED = "overloaded"


class ShedWhenFull:
    """Answers 503 on `routes` (POST, matched by their exact path) while the executor is full."""

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle, routes: Iterable[BaseRoute]) -> None:
        self.app = app
        self.lifecycle = lifecycle
        # The route each path would reach: the request metrics label a shed request as a routed one.
        self.routes = {route.path: route for route in routes if isinstance(route, Route)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        components = self.lifecycle.components
        if route is None or components is None or not components.executor.is_full:
            await self.app(scope, receive, send)
            return
        scope["route"] = route
        self.lifecycle.metrics.rejections.labels(reason=OVERLOADED).inc()
        error = components.executor.queue_full()
        start, body = overloaded_messages(str(error), max(1, round(error.retry_after_s)))
        # A client that retries a 503 at once would otherwise take the event loop (and the cores) from the
        # requests being served; `Retry-After` asked it to wait longer than this anyway.
        await asyncio.sleep(self.lifecycle.settings.shed_delay_ms / 1000)
        await send(start)
        await send(body)


@lru_cache(maxsize=4)
def overloaded_messages(message: str, retry_after_s: int) -> tuple[Message, Message]:
    """The same ASGI messages for every shed request: built once."""
    body = json.dumps(error_envelope(503, OVERLOADED, message)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(retry_after_s).encode()),
    ]
    start = {"type": "http.response.start", "headers": headers, "status": 503}
    return start, {"type": "http.response.body", "body": body}
