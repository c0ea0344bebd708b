"""Shedding that costs nearly nothing: while the queue has no room for even one row, an inference request is
answered 503 `overloaded` by the outermost middleware but the metrics, before routing, before its body is read,
with messages prepared once.

A flood of requests that would all be refused then takes almost none of the cores the engine needs, and the
requests already accepted keep the server's time. The 503 is sent after `shed_delay_ms`, and each refusal in a row on
the same connection waits twice as long as the one before, up to `shed_delay_max_ms` (`RefusalBackoff`): a client
that retries at once (a retry storm, or a hostile tenant) sends one request every few seconds per connection, not
thousands; the connection stays open, and the unread body is skipped by the HTTP server. (Measured: at 8x the
queue's connections, each refusal cost the API process 0.6 ms of CPU, and 780 refusals a second took half a core
from the engine on two cores.) Behind a proxy that pools connections, refusals in a row on one upstream connection
may be different clients': they wait longer for their 503, and the first request taken resets the connection. Any request that could fit goes on to
the full checks (and a request that can never be served gets its 422 there, once the queue has room).
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import Hashable, Iterable
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
        settings = lifecycle.settings
        self.backoff = RefusalBackoff(
            settings.shed_delay_ms / 1000, settings.shed_delay_max_ms / 1000, settings.max_connections
        )
        # The route each path would reach: the request metrics label a shed request as a routed one.
        self.routes = {route.path: route for route in routes if isinstance(route, Route)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        components = self.lifecycle.components
        if route is None or components is None or not components.executor.is_full:
            if route is not None:
                self.backoff.taken(connection_of(scope))
            await self.app(scope, receive, send)
            return
        scope["route"] = route
        metrics = self.lifecycle.metrics
        metrics.rejections.labels(reason=OVERLOADED).inc()
        error = components.executor.queue_full()
        start, body = overloaded_messages(str(error), max(1, round(error.retry_after_s)))
        # A client that retries a 503 at once would otherwise take the event loop (and the cores) from the
        # requests being served; `Retry-After` asked it to wait anyway.
        delay_s = self.backoff.refused(connection_of(scope))
        metrics.shed_delay.observe(delay_s)
        await asyncio.sleep(delay_s)
        await send(start)
        await send(body)


def connection_of(scope: Scope) -> Hashable:
    """The client's (address, port): one TCP connection. None where the server knows no client (a Unix socket):
    those connections share one backoff."""
    client = scope.get("client")
    return tuple(client) if client else None


class RefusalBackoff:
    """How long a refusal waits before its 503, by connection (the client's address and port): the first
    `base_s`, each one in a row on the same connection twice the one before, up to `max_s`; a request taken on
    the connection starts it again. At most `max_connections` connections are remembered, the least recently
    refused forgotten first (a connection closed is forgotten that way)."""

    def __init__(self, base_s: float, max_s: float, max_connections: int) -> None:
        self.base_s, self.max_s, self.max_connections = base_s, max(base_s, max_s), max_connections
        self._refusals: OrderedDict[Hashable, int] = OrderedDict()  # refusals in a row, by connection

    def refused(self, connection: Hashable) -> float:
        """Counts a refusal on `connection` and returns how long it waits."""
        count = self._refusals.pop(connection, 0) + 1
        self._refusals[connection] = count
        if len(self._refusals) > self.max_connections:
            self._refusals.popitem(last=False)
        return min(self.base_s * 2 ** min(count - 1, 32), self.max_s)

    def taken(self, connection: Hashable) -> None:
        self._refusals.pop(connection, None)


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
