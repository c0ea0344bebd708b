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
    """Refuses a body over its limit from its `Content-Length`, before a byte of it is read, or else as it
    streams. JSON (and URL-encoded form) bodies have their own limit, far below the uploads' multipart and
    binary ones: such a body is parsed whole, field by field, and its limit keeps that parse short
    (`max_json_body_bytes`)."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_json_bytes: int) -> None:
        self.app = app
        self.too_large = BodyTooLarge(max_bytes)
        self.json_too_large = BodyTooLarge(
            min(max_json_bytes, max_bytes),
            "JSON or URL-encoded body",
            "(max_json_body_bytes; send a larger training set as multipart/form-data with JSONL files)",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = self.json_too_large if parsed_whole(scope) else self.too_large
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > too_large.limit:
            await error_response(413, "body_too_large", str(too_large))(scope, receive, send)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > too_large.limit:
                    raise BodyRefused(413, "body_too_large", str(too_large))
            return message

        await self.app(scope, limited_receive, send)


def parsed_whole(scope: Scope) -> bool:
    """A body that some route may parse whole into values: JSON, or a URL-encoded form (no route takes one, but
    a route with form fields would parse it, a field at a time)."""
    return may_be_parsed_as_json(scope) or b"application/x-www-form-urlencoded" in _media_types(scope)


def _media_types(scope: Scope) -> list[bytes]:
    return [value.split(b";")[0].strip().lower() for name, value in scope["headers"] if name == b"content-type"]


def may_be_parsed_as_json(scope: Scope) -> bool:
    """JSON, `+json` and similar media types, or none at all (a route may default to JSON); never forms,
    whose JSON fields their routes parse strictly themselves. Every `content-type` header counts: a
    route reads the first, so a second one must not hide it."""
    types = _media_types(scope)
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


async def refuse_too_many_values(body: bytes, limit: int) -> None:
    """A JSON body's values are counted before it is parsed: parsing and validating a few million small values
    takes seconds of the event loop, whatever the schema's list limits (`max_json_values`)."""
    over = strict_json.values_over_by_counts(body, limit)
    if over is None:  # its strings hold brackets or commas: walk past them, off the event loop
        over = await asyncio.to_thread(strict_json.walked_values_over, body, limit)
    if over:
        message = f"the JSON body holds more than {limit} values (max_json_values); no request needs that many"
        raise BodyRefused(413, "body_too_complex", message)


class StrictJSONBody:
    """Every JSON body is strict JSON with a bounded number of values: `NaN`, `Infinity` and `-Infinity` are
    refused with 400 whichever route parses the body and however (FastAPI's `Request.json()` and the routes' own
    `json.loads` accept them), and a body of more than `max_values` values with 413 before anything parses it.
    The checks run when the last chunk of the body is read, so the body size limit applies first."""

    def __init__(self, app: ASGIApp, max_values: int) -> None:
        self.app = app
        self.max_values = max_values

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not may_be_parsed_as_json(scope):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []

        async def checked_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    body = b"".join(chunks)
                    await refuse_too_many_values(body, self.max_values)
                    await refuse_non_finite_literals(body)
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
