"""Every error → HTTP mapping, in one place. Specific handlers first; the catch-all hides internals."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
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
from prompt_store.errors import RetryLater
from server.api.schemas import ErrorResponse
from server.errors import (
    AuthUnavailable,
    ClientDisconnected,
    DeadlineExceeded,
    Forbidden,
    InferenceFailed,
    InvalidInput,
    InvalidRequest,
    ModelNotFound,
    NotReady,
    Overloaded,
    RateLimited,
    Unauthorized,
    UnsupportedParameter,
)
from server.jobs.errors import InvalidDataset, JobConflict, JobNotFound, JobStoreUnavailable, TooManyJobs

log = logging.getLogger(__name__)


class BodyTooLarge(Exception):
    def __init__(self, limit: int, what: str = "request body", setting: str = "(max_body_bytes)") -> None:
        super().__init__(f"the {what} is larger than this server's limit of {limit} bytes {setting}")
        self.limit = limit


class BodyRefused(StarletteHTTPException):
    """A body refused while it is read (by a middleware's `receive`). An HTTP exception, because FastAPI
    re-raises those from its body reading, where it turns any other error into a generic 400."""

    def __init__(self, status_code: int, code: str, message: str) -> None:
        super().__init__(status_code, message)
        self.code = code


# (exception type, HTTP status, error code)
ERROR_STATUSES: list[tuple[type[Exception], int, str]] = [
    (TaskNotFound, 404, "not_found"),
    (VersionNotFound, 404, "not_found"),
    (InvalidPrompt, 422, "invalid_prompt"),
    (UnsupportedFormat, 415, "unsupported_format"),
    (StoreUnavailable, 503, "store_unavailable"),
    (InvalidInput, 422, "invalid_input"),
    (UnsupportedParameter, 400, "unsupported_parameter"),
    (ModelNotFound, 404, "model_not_found"),
    (Overloaded, 503, "overloaded"),
    (RateLimited, 429, "rate_limited"),
    (NotReady, 503, "not_ready"),
    (DeadlineExceeded, 504, "deadline_exceeded"),
    (Unauthorized, 401, "unauthorized"),
    (Forbidden, 403, "forbidden"),
    (AuthUnavailable, 503, "auth_unavailable"),
    (BodyTooLarge, 413, "body_too_large"),
    (ClientDisconnected, 499, "client_closed_request"),
    (InferenceFailed, 500, "inference_failed"),
    (JobNotFound, 404, "not_found"),
    (JobConflict, 409, "conflict"),
    (InvalidDataset, 422, "invalid_dataset"),
    (TooManyJobs, 429, "too_many_jobs"),
    (JobStoreUnavailable, 503, "store_unavailable"),
]

# The table with each error's Retry-After default: a `RetryLater` error's own, none for the others.
ERROR_TABLE: list[tuple[type[Exception], int, str, float | None]] = [
    (exc_type, status, code, exc_type.default_retry_after_s if issubclass(exc_type, RetryLater) else None)
    for exc_type, status, code in ERROR_STATUSES
]

# `softserve_rejections_total{reason}`: the table's codes, but not 404 (an answer about the data, not a refusal).
REJECTION_REASONS = tuple(dict.fromkeys(code for _, status, code, _ in ERROR_TABLE if status != 404))

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


# OpenAI's error `type`s, so that OpenAI clients read these errors as they read OpenAI's.
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_envelope(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """The one error body: `{"error": {"code", "message", "type", "param"}}`, the message made safe for clients;
    `param` names the request field at fault, where one is."""
    return {"error": {"code": code, "message": client_message(message), "type": error_type(status), "param": param}}


def error_param(error: Exception) -> str | None:
    param = getattr(error, "param", None)
    return param if isinstance(param, str) else None


def error_response(
    status: int, code: str, message: str, retry_after: float | None = None, param: str | None = None
) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    return JSONResponse(error_envelope(status, code, message, param), status_code=status, headers=headers)


def _field_path(location: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in location if part != "body") or "body"


def _validation_response(problems: Sequence[Any]) -> JSONResponse:
    """Only each problem's location and `msg` (never its `input` or `ctx`, which may hold any object); `param` is
    the first problem's field."""
    for problem in problems:
        if problem.get("type") == "json_invalid":
            detail = (problem.get("ctx") or {}).get("error")
            suffix = f": {detail}" if isinstance(detail, str) else ""
            return error_response(400, "malformed_json", f"the request body is not valid JSON{suffix}")
    parts = [f"{_field_path(problem.get('loc', ()))}: {problem.get('msg', 'invalid')}" for problem in problems[:5]]
    param = _field_path(problems[0].get("loc", ())) if problems else None
    return error_response(422, "invalid_request", "; ".join(parts), param=param)


def install_error_handlers(app: FastAPI) -> None:
    for exc_type, status, code in ERROR_STATUSES:

        def handler(request: Request, exc: Exception, status: int = status, code: str = code) -> JSONResponse:
            if code in REJECTION_REASONS:
                request.app.state.lifecycle.metrics.rejections.labels(reason=code).inc()
            retry_after = exc.retry_after_s if isinstance(exc, RetryLater) else None
            return error_response(status, code, str(exc), retry_after, error_param(exc))

        app.add_exception_handler(exc_type, handler)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(exc.errors())

    @app.exception_handler(InvalidRequest)
    async def on_invalid_request(request: Request, exc: InvalidRequest) -> JSONResponse:
        return _validation_response(exc.problems)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = getattr(exc, "code", None) or HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal server error; the details are in the server log")
