"""Domain errors. Transports map them to their own status codes in one place.

`code` is the canonical status name (google.rpc.Code), used as the metrics label.
"""

from __future__ import annotations

# Client strings echoed in a message are cut to this many characters, and a whole message
# to MAX_MESSAGE: a megabyte of name must not come back as a megabyte of error.
MAX_ECHO = 100
MAX_MESSAGE = 2000
# Why a draining server refuses requests (and ends ModelStreamInfer streams).
SHUTTING_DOWN = "the server is shutting down; retry on another replica"


def clip(value: object, limit: int = MAX_ECHO) -> str:
    """repr() of a client's value, cut to `limit` characters with '…'; for messages."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


class TapserveError(Exception):
    """Base of every error a client may see; the message says what to fix."""

    code = "INTERNAL"

    def __init__(self, message: str = "") -> None:
        if len(message) > MAX_MESSAGE:
            message = message[:MAX_MESSAGE - 1] + "…"
        super().__init__(message)


class NotFound(TapserveError):
    """Unknown model, version, endpoint, output or tap."""

    code = "NOT_FOUND"


class InvalidInput(TapserveError):
    """Wrong input name, dtype, shape or byte count; a missing input."""

    code = "INVALID_ARGUMENT"


class Overloaded(TapserveError):
    """The model's queue is full: back-pressure."""

    code = "RESOURCE_EXHAUSTED"


class NotReady(TapserveError):
    """The model is still loading, failed to load, or the server is draining."""

    code = "UNAVAILABLE"


class DeadlineExceeded(TapserveError):
    """The request's deadline passed before it was computed."""

    code = "DEADLINE_EXCEEDED"


class Cancelled(TapserveError):
    """The client went away before the request was computed."""

    code = "CANCELLED"


class ConfigError(TapserveError):
    """A model's config.yaml or files are unusable; raised at load, never per request.

    `category` is the short reason a client sending a request to the model may see; the
    message, which may name files, goes to the log and the repository index."""

    code = "INTERNAL"  # reaching a client would be the server's bug

    def __init__(self, message: str = "", category: str = "the model could not be loaded"
                 ) -> None:
        super().__init__(message)
        self.category = category


class LoadFailed(TapserveError):
    """A model the repository API was asked to load failed to (the reason says why)."""

    code = "INVALID_ARGUMENT"  # as Triton answers a failed explicit load


class Unsupported(TapserveError):
    """A call this server's configuration does not allow (e.g. a load in poll mode)."""

    code = "UNIMPLEMENTED"  # Triton's UNSUPPORTED


class Unauthenticated(TapserveError):
    """A call that needs a bearer token came without an accepted one."""

    code = "UNAUTHENTICATED"
