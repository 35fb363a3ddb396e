"""Test servers: the client-facing `eft.v1.EftService` and a `ModelPool` over plain grpc.aio, no Ray.

Owns a grpc.aio servicer over `CoordinatorRpc` (status codes via `context.abort`) and server
factories bound to loopback by default; health and reflection need no API key. Health follows the
coordinator's cached pool probe (`EftCoordinator.health`): NOT_SERVING while any pool is
unreachable. The service itself runs behind Ray Serve's gRPC proxy (`serve.coordinator_deployment`);
these servers run the same `CoordinatorRpc` / `PoolRpc` bodies over real gRPC on loopback so the
integration tests exercise the wire without a Ray cluster. Errors leave servicer methods through
the shared `transport.error_boundary`.
"""

from __future__ import annotations

import contextlib

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from eft_serve.coordinator.health import HealthReport
from eft_serve.proto_gen.eft.v1 import eft_pb2, eft_pb2_grpc, pool_pb2, pool_pb2_grpc
from eft_serve.testing.grpc_pool import PoolServicer
from eft_serve.transport.coordinator_rpc import CoordinatorRpc
from eft_serve.transport.error_boundary import abort_grpc_aio, error_boundary
from eft_serve.transport.pool_rpc import PoolRpc
from eft_serve.transport.status import health_status

SERVICE_NAME = eft_pb2.DESCRIPTOR.services_by_name["EftService"].full_name
POOL_SERVICE_NAME = pool_pb2.DESCRIPTOR.services_by_name["ModelPool"].full_name


class EftServicer(eft_pb2_grpc.EftServiceServicer):
    def __init__(self, rpc: CoordinatorRpc) -> None:
        self._rpc = rpc

    @error_boundary(abort_grpc_aio)
    async def Generate(self, request, context):  # noqa: N802 (gRPC method name)
        async with contextlib.aclosing(await self._rpc.generate(request, context.invocation_metadata())) as stream:
            async for msg in stream:
                yield msg

    @error_boundary(abort_grpc_aio)
    async def Complete(self, request, context):  # noqa: N802
        return await self._rpc.complete(request, context.invocation_metadata())

    @error_boundary(abort_grpc_aio)
    async def Score(self, request, context):  # noqa: N802
        return await self._rpc.score(request, context.invocation_metadata())

    @error_boundary(abort_grpc_aio)
    async def ListModels(self, request, context):  # noqa: N802
        return self._rpc.list_models(context.invocation_metadata())

    @error_boundary(abort_grpc_aio)
    async def ListRecipes(self, request, context):  # noqa: N802
        return self._rpc.list_recipes(context.invocation_metadata())


async def start_coordinator_server(
    rpc: CoordinatorRpc, host: str = "127.0.0.1", port: int = 0
) -> tuple[grpc.aio.Server, int]:
    """Start a grpc.aio server with EftService, health and reflection; returns (server, port)."""
    server = grpc.aio.server()
    eft_pb2_grpc.add_EftServiceServicer_to_server(EftServicer(rpc), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()

    async def publish(report: HealthReport) -> None:
        status = health_status(report)
        for name in (SERVICE_NAME, ""):
            await health_servicer.set(name, status)

    # Check/Watch answer from the servicer's table, updated whenever the coordinator's cached
    # pool probe changes its verdict: a health check never waits on a pool or a request.
    await publish(rpc.coordinator.health())
    rpc.coordinator.add_health_listener(publish)
    return server, bound


async def start_pool_server(rpc: PoolRpc, host: str = "127.0.0.1", port: int = 0) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    pool_pb2_grpc.add_ModelPoolServicer_to_server(PoolServicer(rpc), server)
    reflection.enable_server_reflection([POOL_SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound
