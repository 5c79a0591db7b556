"""Domain errors. Transports map them to their own status codes in one place.

`code` is the canonical status name (google.rpc.Code), used as the metrics label.
"""


class TapserveError(Exception):
    """Base of every error a client may see; the message says what to fix."""

    code = "INTERNAL"


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
    """A model's config.yaml or files are unusable; raised at load, never per request."""

    code = "INTERNAL"  # reaching a client would be the server's bug


class LoadFailed(TapserveError):
    """A model the repository API was asked to load failed to (the reason says why)."""

    code = "INVALID_ARGUMENT"  # as Triton answers a failed explicit load


class Unsupported(TapserveError):
    """A call this server's configuration does not allow (e.g. a load in poll mode)."""

    code = "UNIMPLEMENTED"  # Triton's UNSUPPORTED


class Unauthenticated(TapserveError):
    """A call that needs a bearer token came without an accepted one."""

    code = "UNAUTHENTICATED"
