"""Domain errors with a transport-neutral status, raised by the core, engine wrappers and coordinator.

Owns the mapping from *what went wrong* to a status name (INVALID_ARGUMENT, NOT_FOUND, ...).
Knows nothing about gRPC: the transport layer turns `EftError.status` into a gRPC code, so no
layer below it imports grpc, and anything that is not an `EftError` is a bug (reported as
INTERNAL without a stack trace by the transport).
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    CANCELLED = "CANCELLED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    INTERNAL = "INTERNAL"


def clip(value: object, limit: int = 40) -> str:
    """`repr(value)` cut to `limit` characters: how an error message quotes user input.

    A message names what was wrong, never echoes a whole prompt, stop string or name back
    (log and response sizes stay bounded; nothing a caller sent is reflected at length).
    """
    text = repr(value)
    return text if len(text) <= limit else text[: max(1, limit - 4)] + "…" + text[-1]


class EftError(Exception):
    status: Status = Status.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(EftError):
    status = Status.INVALID_ARGUMENT


class NotFound(EftError):
    status = Status.NOT_FOUND


class PrefixUnknown(EftError):
    """A pool was sent only the tail of a sequence it does not hold; resend the whole prefix."""

    status = Status.FAILED_PRECONDITION


class ResourceExhausted(EftError):
    status = Status.RESOURCE_EXHAUSTED


class RateLimited(ResourceExhausted):
    """Over a caller's quota: `retry_after_s` says when a retry can succeed (a `retry-after` hint)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unauthenticated(EftError):
    """No API key, or one the server does not know."""

    status = Status.UNAUTHENTICATED


class PermissionDenied(EftError):
    """A known API key asked for something it is not allowed (a recipe, exact mode)."""

    status = Status.PERMISSION_DENIED


class Unavailable(EftError):
    status = Status.UNAVAILABLE


class PoolUnreachable(Unavailable):
    """A pool call that failed at the connection level (replica died, connection reset or
    refused): the only failure the coordinator retries, because the wire is stateless and
    another replica can answer. Timeouts and a pool's own errors are never retried."""


class DeadlineExceeded(EftError):
    status = Status.DEADLINE_EXCEEDED


class FailedPrecondition(EftError):
    status = Status.FAILED_PRECONDITION
