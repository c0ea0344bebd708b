"""Connection limits of the HTTP server: what an ASGI middleware never sees.

uvicorn times a connection out only while it idles after a response. A client that connects and sends
nothing, or sends its request head or body a byte at a time (slowloris), holds a socket and a file
descriptor for ever, and enough of them take the server down. `GuardedH11Protocol` bounds every wait:

- head deadline: a request head must arrive whole within `header_timeout_s` of the server starting to
  wait for it (on connect, and after each response), however the bytes trickle in;
- body deadline: a request body that stops arriving for `body_timeout_s` closes the connection (its
  handler sees a disconnect), and so does a response the client stops reading for as long (slow reads);
- a cap on open connections: beyond `max_connections` the connection that has waited longest for a request
  head is closed to make room, so idle sockets never keep real work out; when none is waiting, a request
  on a connection beyond the cap gets 503 and its connection is closed.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from dataclasses import dataclass
from typing import Any

import h11
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.api.errors import error_response

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    header_timeout_s: float
    body_timeout_s: float


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with deadlines on what the client must send, and the connection cap."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.waiting_since = self.loop.time()  # when the server began waiting for the current request head
        self._last_data_at = self.waiting_since
        self._client_stopped_reading_at: float | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._application, self.app = self.app, self._app_within_capacity

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.waiting_since = self.loop.time()
        self._rearm()
        self._make_room()

    def data_received(self, data: bytes) -> None:
        self._last_data_at = self.loop.time()
        super().data_received(data)

    def on_response_complete(self) -> None:
        self.waiting_since = self.loop.time()  # for the next request head (super() starts its cycle)
        super().on_response_complete()
        if not self.transport.is_closing():
            self._rearm()

    def pause_writing(self) -> None:
        """The transport's buffer is full: the client is not reading the response."""
        super().pause_writing()
        self._client_stopped_reading_at = self.loop.time()
        self._rearm()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._client_stopped_reading_at = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    @property
    def waiting_for_head(self) -> bool:
        """No request in flight: the client has sent nothing, or only part of a request head."""
        return self.conn.their_state is h11.IDLE

    def _deadline(self) -> float | None:
        """When this connection must have sent (or read) more, or None while its request is complete and
        its response flows (the handler's own deadline applies then)."""
        if self._client_stopped_reading_at is not None:
            return self._client_stopped_reading_at + self.limits.body_timeout_s
        if self.waiting_for_head:
            return self.waiting_since + self.limits.header_timeout_s
        if self.conn.their_state is h11.SEND_BODY:
            if self.flow.read_paused:  # the handler is behind, not the client
                return self.loop.time() + self.limits.body_timeout_s
            return self._last_data_at + self.limits.body_timeout_s
        return None

    def _rearm(self) -> None:
        """Checks again at this connection's deadline, if it has one (`_on_deadline` moves it on as the
        connection moves from head to body to response)."""
        self._cancel_deadline()
        deadline = self._deadline()
        if deadline is not None:
            self._deadline_timer = self.loop.call_at(deadline, self._on_deadline)

    def _cancel_deadline(self) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None

    def _on_deadline(self) -> None:
        self._deadline_timer = None
        deadline = self._deadline()
        if deadline is None:
            return
        if self.loop.time() < deadline:
            self._rearm()
            return
        log.debug("closing a connection from %s: it sent or read nothing in time", self.client)
        self.close_now()

    def close_now(self) -> None:
        """Closes the socket now: `abort`, because `close` would wait to flush a response the client does
        not read. Leaves the open-connection count at once, not when the loop gets to `connection_lost`, so
        the cap sees it gone."""
        self._cancel_deadline()
        self.connections.discard(self)
        self.transport.abort()

    def _make_room(self) -> None:
        excess = len(self.connections) - self.limits.max_connections
        if excess <= 0:
            return
        others = (c for c in self.connections if c is not self and isinstance(c, GuardedH11Protocol))
        waiting = [c for c in others if c.waiting_for_head]
        for connection in heapq.nsmallest(excess, waiting, key=lambda c: c.waiting_since):
            connection.close_now()

    async def _app_within_capacity(self, scope: Scope, receive: Receive, send: Send) -> None:
        if len(self.connections) <= self.limits.max_connections:
            await self._application(scope, receive, send)
            return
        message = f"the server has {self.limits.max_connections} connections open, all busy; retry later"
        response = error_response(503, "too_many_connections", message, retry_after=1.0)
        response.headers["connection"] = "close"
        await response(scope, receive, send)
