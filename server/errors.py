"""Domain errors of the serving side. The API maps them (and the registry's) to HTTP in one place."""

from __future__ import annotations


class ServingError(Exception):
    """Base class: the message is written for the client."""


class InvalidInput(ServingError):
    """A field is well-formed JSON but not acceptable (too long, over a cap, no labels...)."""


class NonFiniteScores(InvalidInput):
    """The model's scores for one row are not finite (inf/nan), so it cannot be sampled or ranked: that row fails
    (422, retrying cannot help) and the rows that shared its model call are served as usual."""


class Overloaded(ServingError):
    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReady(ServingError):
    """The server is starting, draining or otherwise unable to serve."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


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


class RateLimited(ServingError):
    """A tenant is over its rate limit or quota (429 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
