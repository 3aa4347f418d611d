"""The one error hierarchy of imagineerd.

Every domain error carries the HTTP status it maps to, a short machine-readable ``code`` and,
where one input is at fault, the ``field`` it concerns. The HTTP frontend turns any of them
into the one JSON error body; the CLI and the inbox print ``str(error)``.
"""

from __future__ import annotations


class StoreClosed(RuntimeError):
    """The job store was closed: the daemon stopped (or, in a test, died); threads that
    read it end rather than retry."""


class ImagineerdError(Exception):
    """Base class: a problem we can explain to the user."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict:
        body = {"code": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return body


class ValidationError(ImagineerdError):
    """A value given by the user is missing, of the wrong type or out of bounds."""

    status = 400
    code = "invalid"


class ConfigError(ImagineerdError):
    """config.yaml (or a change to it) is invalid; ``field`` is the dotted key."""

    status = 400
    code = "invalid_config"


class Forbidden(ImagineerdError):
    """The request is understood but not allowed from where it came (another site, the API
    changing a setting that only config.yaml on the server may change)."""

    status = 403
    code = "forbidden"


class NotFound(ImagineerdError):
    status = 404
    code = "not_found"


class Conflict(ImagineerdError):
    status = 409
    code = "conflict"


class Gone(ImagineerdError):
    status = 410
    code = "gone"


class Unavailable(ImagineerdError):
    """A shared resource is busy for now (the job database locked by another process); the
    same request can simply be retried."""

    status = 503
    code = "busy"


class BackendError(ImagineerdError):
    """The generation backend could not be loaded or failed; the job fails with this text."""

    code = "backend_error"


class JobTimeout(ImagineerdError):
    """A job ran past ``performance.job_timeout``; it fails with this text."""

    code = "timeout"


class JobInterrupted(ImagineerdError):
    """Raised from a step callback to stop a running generation at a step boundary."""

    code = "interrupted"
