"""The one error boundary of every servicer: any exception leaves as a proper status, never a trace.

Owns the wrapping of servicer methods — unary (`async def`) and server-streaming (async
generators) alike — so that an `EftError` reaches the client with its own code and message and
anything else becomes INTERNAL with a reference id (the trace goes to the server log only; see
`transport.status`). How the status is delivered differs by host, so the decorator takes a
`StatusSink`: grpc.aio servicers abort the call, Ray Serve's gRPC proxy reads the code set on
its context. Knows nothing of what the methods do.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NoReturn, Protocol, TypeVar, cast

import grpc

from eft_serve.transport.status import to_grpc_status, trailing_metadata_of

F = TypeVar("F", bound=Callable[..., Any])


class StatusSink(Protocol):
    """Delivers (code, details, trailing metadata) for a failed call through `context`; must not return normally."""

    async def __call__(
        self, context: Any, code: grpc.StatusCode, details: str, trailing: Sequence[tuple[str, str]] = ()
    ) -> NoReturn: ...


async def abort_grpc_aio(
    context: Any, code: grpc.StatusCode, details: str, trailing: Sequence[tuple[str, str]] = ()
) -> NoReturn:
    """For grpc.aio servicers: `context.abort` ends the call with the status."""
    await context.abort(code, details, trailing_metadata=tuple(trailing))
    raise AssertionError("grpc.aio context.abort returned")  # it always raises


class RpcFailed(Exception):
    """Raised after the status is set on a Ray Serve gRPC context (Serve needs an exception)."""


async def set_on_serve_context(
    context: Any, code: grpc.StatusCode, details: str, trailing: Sequence[tuple[str, str]] = ()
) -> NoReturn:
    """For Ray Serve deployments behind its gRPC proxy: the proxy sends the code set here."""
    context.set_code(code)
    context.set_details(details)
    if trailing:
        context.set_trailing_metadata(list(trailing))
    raise RpcFailed(details) from None  # the status says it all; no chained trace


def _context_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    # grpc.aio passes the context positionally; Ray Serve passes it as `grpc_context=`.
    if args:
        return args[0]
    for name in ("grpc_context", "context"):
        if name in kwargs:
            return kwargs[name]
    raise TypeError("a servicer method behind the error boundary needs its gRPC context")


def error_boundary(sink: StatusSink) -> Callable[[F], F]:
    """Decorate a servicer method `(self, request, context)` so errors become statuses.

    The context may come positionally (grpc.aio) or as the keyword `grpc_context` (Ray Serve,
    which finds that parameter through the wrapper's signature, see `functools.wraps`).
    """

    def wrap(method: F) -> F:
        if inspect.isasyncgenfunction(method):

            @functools.wraps(method)
            async def streaming(self: Any, request: Any, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
                try:
                    # aclosing: a stream closed early (client gone) closes the method's too, so its
                    # `finally` blocks (quota release, metrics) run now, not at garbage collection.
                    async with contextlib.aclosing(method(self, request, *args, **kwargs)) as items:
                        async for item in items:
                            yield item
                except Exception as e:  # noqa: BLE001 - this is the boundary
                    await sink(_context_of(args, kwargs), *to_grpc_status(e), trailing_metadata_of(e))

            return cast(F, streaming)

        @functools.wraps(method)
        async def unary(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return await cast(Callable[..., Awaitable[Any]], method)(self, request, *args, **kwargs)
            except Exception as e:  # noqa: BLE001 - this is the boundary
                await sink(_context_of(args, kwargs), *to_grpc_status(e), trailing_metadata_of(e))

        return cast(F, unary)

    return wrap
