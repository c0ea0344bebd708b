"""Connection limits of the HTTP server: what an ASGI middleware never sees.

uvicorn times a connection out only while it idles after a response. A client that connects and sends
nothing, or sends its request head or body a byte at a time (slowloris), holds a socket and a file
descriptor for ever, and enough of them take the server down. `GuardedH11Protocol` bounds every wait:

- head deadline: a request head must arrive whole within `header_timeout_s` of the server starting to
  wait for it (on connect, and after each response), however the bytes trickle in;
- body deadlines: a request body that stops arriving for `body_timeout_s`, that is not whole within
  `body_deadline_s` of its head, or that arrives slower than `min_body_bytes_per_s` on average once
  `body_rate_grace_s` has passed, closes the connection (its handler sees a disconnect); so does a response
  the client stops reading for `body_timeout_s` (slow reads);
- a cap on open connections, and one per client address: beyond `max_connections` (or
  `max_connections_per_client` from one address) the connections that have been stuck longest, waiting for
  a request head or in a body behind the minimum rate, are closed to make room, so stalled sockets never
  keep real work out; when none is stuck, nor about to be within `WAIT_FOR_ROOM_S`, a request on a
  connection beyond the cap gets 503 and its connection is closed.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import h11
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.api.errors import error_response

log = logging.getLogger(__name__)

# How far behind the minimum rate a body is stuck, rather than just begun (its first bytes on their way).
STUCK_BEHIND_S = 0.1
# How long a request beyond a cap waits for a connection in a body to fall behind the minimum rate, before 503.
WAIT_FOR_ROOM_S = 0.5


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int
    max_connections_per_client: int  # 0: no limit
    header_timeout_s: float
    body_timeout_s: float
    body_deadline_s: float
    min_body_bytes_per_s: int  # 0: no minimum
    body_rate_grace_s: float


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with deadlines on what the client must send, and the connection cap."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.waiting_since = self.loop.time()  # when the server began waiting for the current request head
        self._last_data_at = self.waiting_since
        self._body_started_at: float | None = None  # when the current request's head was whole
        self._body_bytes = 0  # of the current request's body, counted as they come
        self._over_client_cap = False  # more connections from this address than its cap, when it connected
        self._client_stopped_reading_at: float | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._application, self.app = self.app, self._app_within_capacity

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.waiting_since = self.loop.time()
        self._rearm()
        self._make_room()

    @property
    def client_host(self) -> str | None:
        return self.client[0] if self.client else None

    def data_received(self, data: bytes) -> None:
        self._last_data_at = self.loop.time()
        if self._body_started_at is not None:
            self._body_bytes += len(data)
        super().data_received(data)
        if self._body_started_at is None and self.conn.their_state is h11.SEND_BODY:
            self._body_started_at, self._body_bytes = self._last_data_at, 0
            self._rearm()  # the body's deadlines may come before the head's

    def on_response_complete(self) -> None:
        self.waiting_since = self.loop.time()  # for the next request head (super() starts its cycle)
        self._body_started_at = None
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
            return min(self._last_data_at + self.limits.body_timeout_s, self._body_deadline())
        return None

    def _body_deadline(self) -> float:
        """When the body must be whole, and when its average rate falls below the minimum unless more arrives:
        each byte moves the second one on by at most 1 / `min_body_bytes_per_s` seconds."""
        started = self._body_started_at if self._body_started_at is not None else self.loop.time()
        deadline = started + self.limits.body_deadline_s
        if self.limits.min_body_bytes_per_s:
            rate_allows = max(self.limits.body_rate_grace_s, self._body_bytes / self.limits.min_body_bytes_per_s)
            deadline = min(deadline, started + rate_allows)
        return deadline

    def stuck_since(self) -> float | None:
        """Since when this connection has been stuck, waiting for a request head or in a body more than
        `STUCK_BEHIND_S` behind the minimum rate (grace or not: at a cap, a body that trickles gives way to a
        newcomer); None while it is busy."""
        if self.waiting_for_head:
            return self.waiting_since
        stuck_at = self.body_stuck_at()
        return self._body_started_at if stuck_at is not None and self.loop.time() > stuck_at else None

    def body_stuck_at(self) -> float | None:
        """When this connection's body will be stuck if no more of it arrives; None when it is not in a body
        the client is sending (or there is no minimum rate)."""
        started, rate = self._body_started_at, self.limits.min_body_bytes_per_s
        if self.conn.their_state is not h11.SEND_BODY or self.flow.read_paused or started is None or not rate:
            return None
        return started + self._body_bytes / rate + STUCK_BEHIND_S

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
        """Closes the longest-stuck connections beyond the cap, then beyond this address's cap (counted only when
        there are more connections than that cap: counting takes a pass over them all)."""
        if len(self.connections) > self.limits.max_connections:
            _close_longest_stuck(self._others(), len(self.connections) - self.limits.max_connections)
        self._over_client_cap = False
        if 0 < self.limits.max_connections_per_client < len(self.connections):
            peers = self._others(self.client_host)
            _close_longest_stuck(peers, len(peers) + 1 - self.limits.max_connections_per_client)
            self._over_client_cap = len(self._others(self.client_host)) >= self.limits.max_connections_per_client

    def _others(self, host: str | None = None) -> list[GuardedH11Protocol]:
        """The other open connections (from `host` only, when given)."""
        return [
            c
            for c in self.connections
            if c is not self and isinstance(c, GuardedH11Protocol) and (host is None or c.client_host == host)
        ]

    def _refusal(self) -> str | None:
        """Why a request on this connection cannot be taken now: it is beyond a cap, and no one is stuck."""
        if len(self.connections) > self.limits.max_connections or self._over_client_cap:
            self._make_room()  # others may have closed, or got stuck, since this one connected
        if len(self.connections) > self.limits.max_connections:
            return f"the server has {self.limits.max_connections} connections open, all busy"
        if self._over_client_cap:
            cap = self.limits.max_connections_per_client
            return f"this client address has {cap} connections open, all busy (max_connections_per_client)"
        return None

    def _soonest_stuck_peer_at(self) -> float | None:
        """When the first of the connections this one competes with will be stuck, if none of them sends more."""
        peers = self._others(self.client_host if self._over_client_cap else None)
        return min((at for peer in peers if (at := peer.body_stuck_at()) is not None), default=None)

    async def _app_within_capacity(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self._refusal()
        # Bodies that began a moment ago are not yet behind the minimum rate: one that is about to be waits for it.
        give_up_at = self.loop.time() + WAIT_FOR_ROOM_S
        while (
            refusal is not None and (stuck_at := self._soonest_stuck_peer_at()) is not None and stuck_at <= give_up_at
        ):
            await asyncio.sleep(max(0.0, stuck_at - self.loop.time()) + 0.001)
            refusal = self._refusal()
        if refusal is None:
            await self._application(scope, receive, send)
            return
        response = error_response(503, "too_many_connections", f"{refusal}; retry later", retry_after=1.0)
        response.headers["connection"] = "close"
        await response(scope, receive, send)


def _close_longest_stuck(connections: list[GuardedH11Protocol], excess: int) -> None:
    if excess <= 0:
        return
    stuck = [(since, connection) for connection in connections if (since := connection.stuck_since()) is not None]
    for _, connection in heapq.nsmallest(excess, stuck, key=itemgetter(0)):
        connection.close_now()
