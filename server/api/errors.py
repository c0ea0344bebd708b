"""Every error → HTTP mapping, in one place. Specific handlers first; the catch-all hides internals."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from prompt_store import (
    InvalidPrompt,
    StoreUnavailable,
    TaskNotFound,
    UnsupportedFormat,
    VersionNotFound,
)
from server.errors import (
    AuthUnavailable,
    ClientDisconnected,
    DeadlineExceeded,
    Forbidden,
    InferenceFailed,
    InvalidInput,
    NotReady,
    Overloaded,
    RateLimited,
    Unauthorized,
)
from server.jobs.errors import InvalidDataset, JobConflict, JobNotFound, JobStoreUnavailable, TooManyJobs
from server.schemas import ErrorResponse

log = logging.getLogger(__name__)


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than this server's limit of {limit} bytes")


class BodyRefused(StarletteHTTPException):
    """A body refused while it is read (by a middleware's `receive`). An HTTP exception, because FastAPI
    re-raises those from its body reading, where it turns any other error into a generic 400."""

    def __init__(self, status_code: int, code: str, message: str) -> None:
        super().__init__(status_code, message)
        self.code = code


# (exception type, HTTP status, error code, seconds for Retry-After or None)
ERROR_TABLE: list[tuple[type[Exception], int, str, float | None]] = [
    (TaskNotFound, 404, "not_found", None),
    (VersionNotFound, 404, "not_found", None),
    (InvalidPrompt, 422, "invalid_prompt", None),
    (UnsupportedFormat, 415, "unsupported_format", None),
    (StoreUnavailable, 503, "store_unavailable", 1.0),
    (InvalidInput, 422, "invalid_input", None),
    (Overloaded, 503, "overloaded", 1.0),
    (RateLimited, 429, "rate_limited", 1.0),
    (NotReady, 503, "not_ready", 1.0),
    (DeadlineExceeded, 504, "deadline_exceeded", None),
    (Unauthorized, 401, "unauthorized", None),
    (Forbidden, 403, "forbidden", None),
    (AuthUnavailable, 503, "auth_unavailable", None),
    (BodyTooLarge, 413, "body_too_large", None),
    (ClientDisconnected, 499, "client_closed_request", None),
    (InferenceFailed, 500, "inference_failed", None),
    (JobNotFound, 404, "not_found", None),
    (JobConflict, 409, "conflict", None),
    (InvalidDataset, 422, "invalid_dataset", None),
    (TooManyJobs, 429, "too_many_jobs", 30.0),
    (JobStoreUnavailable, 503, "store_unavailable", 1.0),
]

HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "body_too_large",
    415: "unsupported_format",
    422: "invalid_request",
    429: "rate_limited",
    403: "forbidden",
    499: "client_closed_request",
    500: "internal_error",
    503: "unavailable",
    504: "deadline_exceeded",
}


def documented_errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries: every error has the same `{"error": {...}}` body."""
    return {status: {"model": ErrorResponse, "description": HTTP_CODES.get(status, "error")} for status in statuses}


# `<ast.Call object at 0x7f...>`, `<function f at 0x...>`: reprs that libraries put in their messages.
OBJECT_REPR = re.compile(r"<[^<>]*\bat 0x[0-9a-fA-F]+>")
MEMORY_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{8,}\b")
TRACEBACK = "Traceback (most recent call last)"
MAX_MESSAGE_CHARS = 1000


def client_message(message: str) -> str:
    """What an error may tell a client. Messages quote library errors and what the client sent, so: no
    reprs of server objects or memory addresses, no tracebacks, and a bounded length."""
    message = OBJECT_REPR.sub("<object>", message.split(TRACEBACK, 1)[0])
    message = MEMORY_ADDRESS.sub("0x…", message).strip()
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 1] + "…"
    return message or "the request was refused"


def error_response(status: int, code: str, message: str, retry_after: float | None = None) -> JSONResponse:
    """The one error body: `{"error": {"code", "message"}}`, the message made safe for clients."""
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    body = {"error": {"code": code, "message": client_message(message)}}
    return JSONResponse(body, status_code=status, headers=headers)


def _field_path(location: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in location if part != "body") or "body"


def _validation_message(error: RequestValidationError) -> tuple[int, str, str]:
    """Only each problem's location and `msg` (never its `input` or `ctx`, which may hold any object)."""
    problems = error.errors()
    for problem in problems:
        if problem.get("type") == "json_invalid":
            detail = (problem.get("ctx") or {}).get("error")
            suffix = f": {detail}" if isinstance(detail, str) else ""
            return 400, "malformed_json", f"the request body is not valid JSON{suffix}"
    parts = [f"{_field_path(problem.get('loc', ()))}: {problem.get('msg', 'invalid')}" for problem in problems[:5]]
    return 422, "invalid_request", "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    for exc_type, status, code, retry_after in ERROR_TABLE:

        def handler(
            request: Request, exc: Exception, status: int = status, code: str = code, retry: float | None = retry_after
        ) -> JSONResponse:
            if status != 404:
                request.app.state.lifecycle.metrics.rejections.labels(reason=code).inc()
            return error_response(status, code, str(exc), getattr(exc, "retry_after_s", retry))

        app.add_exception_handler(exc_type, handler)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, code, message = _validation_message(exc)
        return error_response(status, code, message)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = getattr(exc, "code", None) or HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal server error; the details are in the server log")
