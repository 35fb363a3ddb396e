"""The coordinator Serve deployment: the `eft.v1.EftService` methods behind Serve's gRPC proxy.

Owns replica start-up (tokenizer, pool handles, result cache, the vocabulary check — a mismatch
fails the deployment with a message naming the pools) and status codes on the proxy path: an
`EftError` sets its code and details on the Serve gRPC context; anything else becomes INTERNAL
with a reference, never a stack trace. Also answers `grpc.health.v1.Health/Check`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator

from grpc_health.v1 import health_pb2
from ray import serve

from eft_serve.config import EftConfig
from eft_serve.coordinator.service import EftCoordinator
from eft_serve.errors import FailedPrecondition, Unavailable
from eft_serve.serve.names import COORDINATOR_DEPLOYMENT
from eft_serve.serve.metrics import CacheMetrics
from eft_serve.serve.pool_client import ServePoolClient
from eft_serve.transport.coordinator_rpc import CoordinatorRpc
from eft_serve.transport.status import to_grpc_status

log = logging.getLogger("eft_serve")


class _RpcFailed(Exception):
    """Raised after the status is set on the Serve gRPC context (Serve requires an exception)."""


def _fail(grpc_context: Any, exc: BaseException) -> _RpcFailed:
    code, details = to_grpc_status(exc)
    grpc_context.set_code(code)
    grpc_context.set_details(details)
    return _RpcFailed(details)


@serve.deployment(name=COORDINATOR_DEPLOYMENT)
class CoordinatorDeployment:
    async def __init__(self, config: dict[str, Any]) -> None:
        from transformers import AutoTokenizer

        from eft_serve.cache.factory import build_cache
        from eft_serve.models import resolve_model_path

        cfg = EftConfig.model_validate(config)
        base_role = cfg.recipes[cfg.coordinator.default_recipe].base
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.pools[base_role].model))
        pools = {role: ServePoolClient(role) for role in cfg.pools}
        cache = build_cache(cfg.cache)
        self._metrics = CacheMetrics(cache)
        self._coordinator = EftCoordinator(
            pools, cfg.recipes, tokenizer, cfg.coordinator,
            cache=cache,
            cache_key_prefix=cfg.cache.key_prefix, cache_recipes=cfg.cache.recipes,
        )
        deadline = time.monotonic() + cfg.coordinator.startup_timeout_s
        while True:
            try:
                await self._coordinator.start()
                break
            except FailedPrecondition:
                raise  # a vocabulary mismatch will not fix itself: fail the deployment, loudly
            except Unavailable as e:
                if time.monotonic() > deadline:
                    raise
                log.warning("waiting for model pools: %s", e)
                await asyncio.sleep(1.0)
        self._rpc = CoordinatorRpc(self._coordinator)

    async def Generate(self, request, grpc_context) -> AsyncIterator[Any]:  # noqa: N802 (RPC name)
        try:
            stream = await self._rpc.generate(request)
            async for msg in stream:
                yield msg
        except Exception as e:  # noqa: BLE001 - EftError keeps its code; anything else is INTERNAL, no trace
            raise _fail(grpc_context, e) from None
        finally:
            self._metrics.export()

    async def Complete(self, request, grpc_context):  # noqa: N802
        try:
            return await self._rpc.complete(request)
        except Exception as e:  # noqa: BLE001
            raise _fail(grpc_context, e) from None
        finally:
            self._metrics.export()

    async def Score(self, request, grpc_context):  # noqa: N802
        try:
            return await self._rpc.score(request)
        except Exception as e:  # noqa: BLE001
            raise _fail(grpc_context, e) from None

    async def ListModels(self, request):  # noqa: N802
        return self._rpc.list_models()

    async def ListRecipes(self, request):  # noqa: N802
        return self._rpc.list_recipes()

    async def Check(self, request):  # noqa: N802 (grpc.health.v1.Health/Check)
        # A replica exists only after its start-up vocabulary check passed: it can serve.
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    async def Watch(self, request) -> AsyncIterator[Any]:  # noqa: N802 (grpc.health.v1.Health/Watch)
        # One update, then the stream ends: holding a replica slot per watcher would starve
        # real requests; watchers re-subscribe (or poll Check) as gRPC health clients do on end.
        yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
