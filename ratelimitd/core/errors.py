"""Typed errors of the engine; the API layer maps each kind to one gRPC status."""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    FAILED_PRECONDITION = "failed_precondition"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    UNAVAILABLE = "unavailable"


class RatelimitdError(Exception):
    """An error a caller can act on. ``transient`` errors may pass on retry."""

    kind: ErrorKind = ErrorKind.INVALID_ARGUMENT
    transient = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(RatelimitdError):
    kind = ErrorKind.INVALID_ARGUMENT


class NotFound(RatelimitdError):
    kind = ErrorKind.NOT_FOUND


class AlreadyExists(RatelimitdError):
    kind = ErrorKind.ALREADY_EXISTS


class FailedPrecondition(RatelimitdError):
    kind = ErrorKind.FAILED_PRECONDITION


class Unauthenticated(RatelimitdError):
    kind = ErrorKind.UNAUTHENTICATED


class PermissionDenied(RatelimitdError):
    kind = ErrorKind.PERMISSION_DENIED


class StorageUnavailable(RatelimitdError):
    kind = ErrorKind.UNAVAILABLE
    transient = True


class StorageOutcomeUnknown(StorageUnavailable):
    """Storage failed after the call was sent (a timeout, a broken connection): the
    call may or may not have been applied. A retry with the same request id is exact."""

    RETRY_EXACTLY = (
        "Retry with the same request_id: a decision is then replayed exactly and a usage report counted once"
    )

    def __init__(self, cause: str, advice: str = RETRY_EXACTLY) -> None:
        super().__init__(f"{cause} after the call was sent, so it may have been applied. {advice}")
        self.cause = cause

    def advising(self, advice: str) -> StorageOutcomeUnknown:
        """The same failure, with what this caller can do about it."""
        return StorageOutcomeUnknown(self.cause, advice)
