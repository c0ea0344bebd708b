"""ASGI middleware: request metrics, and the checks made while a body is read (size, strict JSON)."""

from __future__ import annotations

import asyncio
import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import strict_json
from server.api.errors import BodyRefused, BodyTooLarge, error_response
from server.metrics import ServerMetrics

# A body past this size is parsed off the event loop when it has to be parsed here.
PARSE_INLINE_MAX_BYTES = 64 * 1024


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(413, "body_too_large", str(BodyTooLarge(self.max_bytes)))(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyRefused(413, "body_too_large", str(BodyTooLarge(self.max_bytes)))
            return message

        await self.app(scope, limited_receive, send)


def _may_be_parsed_as_json(scope: Scope) -> bool:
    """JSON, `+json` and similar media types, or none at all (a route may default to JSON); never forms,
    whose JSON fields their routes parse strictly themselves. Every `content-type` header counts: a
    route reads the first, so a second one must not hide it."""
    types = [value.split(b";")[0].lower() for name, value in scope["headers"] if name == b"content-type"]
    return not types or any(b"json" in media_type for media_type in types)


def _may_hold_non_finite_literal(body: bytes) -> bool:
    """A cheap scan: in UTF-8 (the only encoding JSON bodies may use) no `NaN`/`Infinity` literal hides from
    a byte search. Other encodings, which Python's `json` also decodes, always get the full parse."""
    if json.detect_encoding(body) not in ("utf-8", "utf-8-sig"):
        return True
    return b"NaN" in body or b"Infinity" in body


def _non_finite_literal_problem(body: bytes) -> str | None:
    try:
        strict_json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None  # not JSON at all: the route that parses it says so
    except ValueError as error:
        return str(error)
    return None


async def refuse_non_finite_literals(body: bytes) -> None:
    if not _may_hold_non_finite_literal(body):
        return
    if len(body) <= PARSE_INLINE_MAX_BYTES:
        problem = _non_finite_literal_problem(body)
    else:
        problem = await asyncio.to_thread(_non_finite_literal_problem, body)
    if problem is not None:
        raise BodyRefused(400, "malformed_json", f"the request body is refused: {problem}")


class StrictJSONBody:
    """Every JSON body is strict JSON: `NaN`, `Infinity` and `-Infinity` are refused with 400 whichever route
    parses the body and however (FastAPI's `Request.json()` and the routes' own `json.loads` accept them).
    The check runs when the last chunk of the body is read, so the body size limit applies first."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _may_be_parsed_as_json(scope):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []

        async def checked_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    await refuse_non_finite_literals(b"".join(chunks))
                    chunks.clear()
            return message

        await self.app(scope, checked_receive, send)


class RequestMetrics:
    """Counts requests by route template (never the raw path) and status, and times them."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route=route, status=str(status)).inc()
            self.metrics.request_duration.labels(route=route).observe(time.perf_counter() - started)
