"""One small hierarchy of errors, each carrying the HTTP status it maps to.

Every error keeps ``__init__(self, message)`` so it pickles across Ray process boundaries unchanged.
"""

from __future__ import annotations


class DiffguardError(Exception):
    """Base class: a message meant for the user and the HTTP status it maps to."""

    status_code: int = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __reduce__(self):
        return (type(self), (self.message,))


class InvalidInput(DiffguardError, ValueError):
    """A request parameter or argument is outside what is allowed."""

    status_code = 422


class ImageDecodeError(DiffguardError, ValueError):
    """An image could not be decoded or is not allowed (corrupt, too large, not an image)."""

    status_code = 400


class PayloadTooLarge(DiffguardError):
    """A request body is over the configured limit."""

    status_code = 413


class ModelSourceError(DiffguardError):
    """A model could not be loaded from the source given (hub id, directory or ``tiny``)."""

    status_code = 500


class Unavailable(DiffguardError):
    """A component the request needs (the checker, the generator) is not available; retry later."""

    status_code = 503


class AuditUnavailable(Unavailable):
    """The audit log could not record a row (its group commit failed): the decision must not be released."""

    status_code = 503


class UsageError(DiffguardError):
    """A command line that cannot run as given (the CLI's exit status 2)."""

    status_code = 400


class Unauthorized(DiffguardError):
    """A request without the API key, or with a wrong one."""

    status_code = 401


class Forbidden(DiffguardError):
    """A valid key asking for something it may not do (a route outside its `routes:`)."""

    status_code = 403


class TooManyRequests(DiffguardError):
    """A key over its quota; ``retry_after_s`` says when the request would fit (the ``Retry-After`` header)."""

    status_code = 429

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        return (type(self), (self.message, self.retry_after_s))


class UnsupportedMediaType(DiffguardError):
    """A request body of a content type the route does not take."""

    status_code = 415


class StorageError(DiffguardError):
    """The store cannot be reached or refuses access (no such bucket, denied, no credentials, network)."""

    status_code = 502


class ObjectExists(StorageError):
    """An exclusive create found the name taken (by another object, or a folder): nothing was written."""

    status_code = 409


class ObjectChanged(StorageError):
    """The object is not the version asked for (another version, other bytes, or gone): nothing was read or done."""

    status_code = 409


class DestBusy(DiffguardError):
    """Another scan holds DEST's lock (one scan per DEST at a time): nothing was written (the CLI's exit status 2)."""

    status_code = 409


class AuthConfigError(DiffguardError):
    """The service's key settings would leave it open by accident; it refuses to start."""

    status_code = 500


class DeployFailed(DiffguardError):
    """A Serve application did not reach RUNNING."""

    status_code = 500
