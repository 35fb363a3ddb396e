"""Model pools over plain grpc.aio: a servicer over `PoolRpc` and a `PoolClient` over a channel.

Owns gRPC specifics only (status codes both ways, per-call timeouts). For tests: pools outside Ray
over real gRPC on loopback (`testing.grpc_coordinator.start_pool_server`); the service's client of
a pool is `serve.pool_handle` (Ray Serve).
Errors leave servicer methods through the shared `transport.error_boundary`.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from eft_serve.engine.types import DraftedSequence, DraftQuery, ModelInfo, SequenceQuery, SequenceResult
from eft_serve.errors import (
    DeadlineExceeded,
    EftError,
    InvalidArgument,
    PoolUnreachable,
    PrefixUnknown,
    ResourceExhausted,
    Status,
    Unavailable,
)
from eft_serve.proto_gen.eft.v1 import pool_pb2, pool_pb2_grpc
from eft_serve.transport.error_boundary import abort_grpc_aio, error_boundary
from eft_serve.transport.pool_rpc import PoolRpc
from eft_serve.transport.status import status_from_grpc
from eft_serve.wire.pool_messages import (
    drafted_from_proto,
    drafts_to_proto,
    info_from_proto,
    queries_to_proto,
    results_from_proto,
)


class PoolServicer(pool_pb2_grpc.ModelPoolServicer):
    def __init__(self, rpc: PoolRpc) -> None:
        self._rpc = rpc

    @error_boundary(abort_grpc_aio)
    async def NextTokenLogprobs(self, request, context):  # noqa: N802 (gRPC method name)
        return await self._rpc.next_token_logprobs(request)

    @error_boundary(abort_grpc_aio)
    async def Draft(self, request, context):  # noqa: N802
        return await self._rpc.draft(request)

    @error_boundary(abort_grpc_aio)
    async def Info(self, request, context):  # noqa: N802
        return self._rpc.info()


_STATUS_ERRORS: dict[Status, type[EftError]] = {
    Status.INVALID_ARGUMENT: InvalidArgument,
    Status.DEADLINE_EXCEEDED: DeadlineExceeded,
    # The only precondition a pool checks: it holds the omitted head of an incremental prefix.
    Status.FAILED_PRECONDITION: PrefixUnknown,
    Status.RESOURCE_EXHAUSTED: ResourceExhausted,
    # grpc's UNAVAILABLE is the connection-level failure (refused, reset, server gone): retryable.
    Status.UNAVAILABLE: PoolUnreachable,
}


class GrpcPoolClient:
    """`PoolClient` over a grpc.aio channel to a `ModelPool` server."""

    def __init__(self, address: str, role: str, timeout_s: float = 30.0) -> None:
        self.role = role
        self._address = address
        self._timeout = timeout_s
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = pool_pb2_grpc.ModelPoolStub(self._channel)

    def _error(self, e: grpc.aio.AioRpcError) -> EftError:
        status = status_from_grpc(e.code())
        cls = _STATUS_ERRORS.get(status, Unavailable)
        return cls(f"model pool {self.role!r} at {self._address}: {e.details() or e.code().name}")

    async def info(self) -> ModelInfo:
        try:
            return info_from_proto(await self._stub.Info(pool_pb2.PoolInfoRequest(), timeout=self._timeout))
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from None

    async def next_token_logprobs(
        self, queries: Sequence[SequenceQuery], logprob_top_k: int, deadline: float | None
    ) -> list[SequenceResult]:
        try:
            reply = await self._stub.NextTokenLogprobs(
                queries_to_proto(queries, logprob_top_k, deadline), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from None
        return results_from_proto(reply)

    async def draft(
        self, queries: Sequence[DraftQuery], deadline: float | None, score_logprob_top_k: int | None = None
    ) -> list[DraftedSequence]:
        try:
            request = drafts_to_proto(queries, deadline, score_logprob_top_k)
            reply = await self._stub.Draft(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as e:
            raise self._error(e) from None
        return drafted_from_proto(reply)

    async def close(self) -> None:
        await self._channel.close()
