"""Domain errors of the serving side. The API maps them (and the registry's) to HTTP in one place."""

from __future__ import annotations

from typing import Any

from prompt_store.errors import RetryLater


class ServingError(Exception):
    """Base class: the message is written for the client."""


class InvalidInput(ServingError):
    """A field is well-formed JSON but not acceptable (too long, over a cap, no labels...)."""


class InvalidParameter(InvalidInput):
    """An `InvalidInput` caused by one request field, named in `param` (the error body's `param`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class UnsupportedParameter(ServingError):
    """A parameter of a borrowed API (OpenAI's) that this server cannot honour: refused by name, never ignored."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class ModelNotFound(ServingError):
    """An OpenAI `model` that names none of the caller's tasks (or a version the task lacks)."""

    param = "model"


class InvalidRequest(ServingError):
    """A body that does not fit its schema, parsed by a service rather than by FastAPI: `problems` as pydantic
    lists them (location, message), so the API answers it as it answers FastAPI's own request validation."""

    def __init__(self, problems: list[Any]) -> None:
        super().__init__("; ".join(str(problem.get("msg", "invalid")) for problem in problems))
        self.problems = problems


class NonFiniteScores(InvalidInput):
    """The model's scores for one row are not finite (inf/nan), so it cannot be sampled or ranked: that row fails
    (422, retrying cannot help) and the rows that shared its model call are served as usual."""


class Overloaded(ServingError, RetryLater):
    """No room for the work now (a full queue, device memory)."""


class NotReady(ServingError, RetryLater):
    """The server is starting, draining or otherwise unable to serve."""


class DeadlineExceeded(ServingError):
    pass


class Unauthorized(ServingError):
    pass


class Forbidden(ServingError):
    """A valid key without the scope a route needs."""


class AuthUnavailable(ServingError):
    """The API keys cannot be read (a corrupt or removed keys file): every request is refused (fail closed)."""


class InferenceFailed(ServingError):
    """The model call for a batch failed; every request of that batch gets this."""


class ClientDisconnected(ServingError):
    """The client went away; its rows are dropped and no response is sent."""


class RateLimited(ServingError, RetryLater):
    """A tenant is over its rate limit or quota (429 with Retry-After)."""
