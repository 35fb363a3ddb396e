"""Mapping domain errors to gRPC status codes and user-facing messages.

Owns the one table from `eft_serve.errors.Status` to `grpc.StatusCode`, and the rule that an
unexpected exception reaches a client as INTERNAL with a reference, never a stack trace; and the
`grpc.health.v1` status of the coordinator's health report.
"""

from __future__ import annotations

import logging
import math
import uuid

import grpc
from grpc_health.v1 import health_pb2

from eft_serve.coordinator.health import HealthReport
from eft_serve.errors import EftError, RateLimited, Status

log = logging.getLogger("eft_serve")

_CODES = {
    Status.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Status.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Status.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Status.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Status.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    Status.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Status.CANCELLED: grpc.StatusCode.CANCELLED,
    Status.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Status.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Status.INTERNAL: grpc.StatusCode.INTERNAL,
}

_FROM_GRPC = {v: k for k, v in _CODES.items()}


def to_grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The (code, details) a client should see for `exc`."""
    if isinstance(exc, EftError):
        return _CODES[exc.status], exc.message
    ref = uuid.uuid4().hex[:12]
    log.error("unexpected error (ref %s)", ref, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (ref {ref}); the server log has the details"


def trailing_metadata_of(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """Trailing metadata that goes with the status of `exc`: `retry-after` (whole seconds) when over a quota."""
    if isinstance(exc, RateLimited):
        return (("retry-after", str(max(1, math.ceil(exc.retry_after_s)))),)
    return ()


def status_from_grpc(code: grpc.StatusCode) -> Status:
    return _FROM_GRPC.get(code, Status.UNAVAILABLE)


def health_status(report: HealthReport) -> int:
    """The `grpc.health.v1` status of a coordinator health report."""
    if report.serving:
        return health_pb2.HealthCheckResponse.SERVING
    return health_pb2.HealthCheckResponse.NOT_SERVING
