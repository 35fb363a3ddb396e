"""Errors of the OpenAI-compatible HTTP API: domain errors -> HTTP status + OpenAI error body.

Owns the one table from `eft_serve.errors.Status` to an HTTP status and OpenAI's error `type`,
the body `{"error": {"message", "type", "param", "code"}}`, `Retry-After` when over a quota and
`WWW-Authenticate` on 401; anything that is not an `EftError` is a 500 with a reference id (the
trace in the server log only, as on gRPC). Knows nothing of routes or of the web framework.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from eft_serve.errors import EftError, NotFound, RateLimited, Status
from eft_serve.transport.openai_schema import BadParam
from eft_serve.transport.status import to_grpc_status

_HTTP: dict[Status, tuple[int, str]] = {
    Status.INVALID_ARGUMENT: (400, "invalid_request_error"),
    Status.FAILED_PRECONDITION: (400, "invalid_request_error"),
    Status.UNAUTHENTICATED: (401, "authentication_error"),
    Status.PERMISSION_DENIED: (403, "permission_error"),
    Status.NOT_FOUND: (404, "not_found_error"),
    Status.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    Status.CANCELLED: (499, "cancelled"),
    Status.INTERNAL: (500, "server_error"),
    Status.UNAVAILABLE: (503, "service_unavailable"),
    Status.DEADLINE_EXCEEDED: (504, "timeout_error"),
}


class ModelNotFound(NotFound):
    """The `model` of a request names no recipe."""


@dataclass
class HttpError:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def to_http_error(exc: BaseException) -> HttpError:
    """What a client of the OpenAI API sees for `exc` (never a stack trace)."""
    if not isinstance(exc, EftError):
        _, message = to_grpc_status(exc)  # logs the trace under a reference id
        return HttpError(500, error_body(message, "server_error", code="internal_error"))
    status, type_ = _HTTP.get(exc.status, (500, "server_error"))
    param = exc.param if isinstance(exc, BadParam) else None
    message = exc.message
    code: str | None = None
    headers: dict[str, str] = {}
    if isinstance(exc, ModelNotFound):
        param, code = "model", "model_not_found"
    elif exc.status == Status.UNAUTHENTICATED:
        code = "invalid_api_key"
        headers["WWW-Authenticate"] = "Bearer"
    elif isinstance(exc, RateLimited):
        code = "rate_limit_exceeded"
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    elif exc.status == Status.INVALID_ARGUMENT and param is None:
        param, message = _param_of(exc.message)
    return HttpError(status, error_body(message, type_, param, code), headers)


# The coordinator's validation messages start with its own field name; OpenAI's name for it.
_PARAMS = {
    "max_new_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "stop": "stop",
    "beta": "beta",
    "expert_weights": "expert_weights",
    "logprob_top_k": "logprob_top_k",
    "conservative_top_p": "conservative_top_p",
    "speculative.max_draft_tokens": "max_draft_tokens",
    "timeout_s": "timeout_s",
    "prompt": "prompt",
    "messages": "messages",
}


def _param_of(message: str) -> tuple[str | None, str]:
    """(OpenAI's name of the field a coordinator message is about, the message in OpenAI's names)."""
    word = message.split(" ", 1)[0].rstrip(":,")
    param = _PARAMS.get(word)
    if param is None:
        return None, message
    return param, param + message[len(word) :]
