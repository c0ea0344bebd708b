"""Every error → HTTP mapping, in one place. Specific handlers first; the catch-all hides internals."""

from __future__ import annotations

import logging
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


def error_response(status: int, code: str, message: str, retry_after: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _validation_message(error: RequestValidationError) -> tuple[int, str, str]:
    problems = error.errors()
    if any(p.get("type") == "json_invalid" for p in problems):
        return 400, "malformed_json", "the request body is not valid JSON"
    parts = []
    for problem in problems[:5]:
        where = ".".join(str(x) for x in problem.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {problem.get('msg', 'invalid')}")
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
        code = HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal server error; the details are in the server log")
