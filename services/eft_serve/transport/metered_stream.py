"""A coordinator stream as a client door serves it: admitted, metered, traced, always released.

Owns the order every door (gRPC `Generate`/`Complete`, the OpenAI routes) opens a stream in —
build the request, admit it (auth, permission, quota: the lease), start the coordinator's stream
(validation errors raise here) — and the stream wrapper that charges each chunk's tokens to the
lease, reports them to the request's trace, and releases the lease / ends the trace exactly once
however the stream ends (finished, failed, closed by the client, or never iterated). Knows nothing
of wire formats: each door converts chunks itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from eft_serve.auth.quotas import Lease
from eft_serve.coordinator.request import GenerationChunk, GenerationRequest
from eft_serve.coordinator.service import EftCoordinator
from eft_serve.coordinator.telemetry import RequestTrace


async def open_metered(
    coordinator: EftCoordinator,
    build_request: Callable[[], GenerationRequest],
    admit: Callable[[], Awaitable[Lease]],
    trace: RequestTrace,
) -> MeteredStream:
    """Admit, then start the stream; on any refusal the trace ends with it and no lease is held.

    Admission comes first (an unauthenticated client learns nothing about its request's
    validity); the request is built after it, so its conversion errors release the lease."""
    try:
        lease = await admit()  # auth, permission and quota errors raise here
    except BaseException as e:
        trace.finish(e)
        raise
    trace.record.key_id = lease.key_id or "-"
    try:
        stream = await coordinator.generate(build_request())  # validation errors raise here
    except BaseException as e:
        lease.release()
        trace.finish(e)
        raise
    return MeteredStream(stream, lease, trace)


class MeteredStream:
    """A coordinator stream holding a quota lease and a trace: charges tokens, reports them, and
    releases the lease / ends the trace when it ends.

    A class rather than an async generator so that a stream closed before its first item (or
    never iterated: the HTTP client went away) still releases its lease; `__del__` is the backstop.
    """

    def __init__(self, stream: AsyncIterator[GenerationChunk], lease: Lease, trace: RequestTrace) -> None:
        self._stream = stream
        self._lease = lease
        self._trace = trace

    def __aiter__(self) -> MeteredStream:
        return self

    async def __anext__(self) -> GenerationChunk:
        try:
            chunk = await anext(self._stream)
        except StopAsyncIteration:
            self._trace.finish()
            await self.aclose()
            raise
        except BaseException as e:
            self._trace.finish(e)
            await self.aclose()
            raise
        self._lease.charge(len(chunk.tokens))
        self._trace.tokens(len(chunk.tokens))
        if chunk.usage is not None:
            self._trace.usage(chunk.usage)
        return chunk

    async def aclose(self) -> None:
        self._lease.release()
        self._trace.finish(asyncio.CancelledError())  # no-op if it already ended; else the client left
        close = getattr(self._stream, "aclose", None)
        if close is not None:
            await close()

    def __del__(self) -> None:
        self._lease.release()  # idempotent
