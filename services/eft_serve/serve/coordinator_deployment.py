"""The coordinator Serve deployment: the `eft.v1.EftService` methods behind Serve's gRPC proxy.

Owns replica start-up (tokenizer, pool handles, result cache, the vocabulary check — a mismatch
fails the deployment with a message naming the pools); status codes on the proxy path come from
the shared `transport.error_boundary` (set on Serve's gRPC context). Also answers
`grpc.health.v1.Health/Check` (open: no API key needed) from the coordinator's cached pool probe:
NOT_SERVING while a pool is unreachable. API keys and quotas are checked in
`CoordinatorRpc` from the call's metadata, as on the plain grpc.aio server. The same replicas
serve the OpenAI-compatible HTTP routes behind Serve's HTTP proxy (`@serve.ingress`; the app is
`transport.openai_http`, built per replica over this replica's coordinator and gate): one decode
loop for both doors.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

from grpc_health.v1 import health_pb2
from ray import serve

from eft_serve.auth.gate import Gate
from eft_serve.auth.keys import load_key_store
from eft_serve.config import EftConfig
from eft_serve.coordinator.access_log import AccessLog, install_handler
from eft_serve.coordinator.pool_client import ColocatedRole, PoolClient
from eft_serve.coordinator.service import EftCoordinator
from eft_serve.coordinator.telemetry import FanOut, Telemetry
from eft_serve.errors import FailedPrecondition, Unavailable
from eft_serve.serve.metrics import CacheMetrics, PoolWireMetrics, QuotaMetrics, ServeMetrics
from eft_serve.serve.names import COORDINATOR_DEPLOYMENT
from eft_serve.serve.pool_handle import ServePoolClient
from eft_serve.serve.quota_limiter import build_quota_limiter
from eft_serve.serve.replica_cpu import apply_replica_cpu_settings
from eft_serve.serve.startup_failure import marked
from eft_serve.transport.coordinator_rpc import CoordinatorRpc
from eft_serve.transport.error_boundary import error_boundary, set_on_serve_context
from eft_serve.transport.openai_api import OpenAIApi
from eft_serve.transport.openai_http import build_openai_app
from eft_serve.transport.status import health_status

if TYPE_CHECKING:
    from eft_serve.adapters import LoraLink

log = logging.getLogger("eft_serve")


def coordinator_pools(
    cfg: EftConfig, links: Mapping[str, LoraLink], client: Callable[[str], PoolClient]
) -> dict[str, PoolClient]:
    """The coordinator's pool clients: `client(role)` for every pool with a deployment of its own
    (`serve.app.pool_apps`), and a `ColocatedRole` over its host's client for each co-located
    LoRA role (several adapters may share one host: each is tagged with its own adapter)."""
    pools: dict[str, PoolClient] = {
        role: client(role) for role in cfg.pools if not (role in links and links[role].colocated)
    }
    for role, link in links.items():
        if link.colocated:  # served inside its base's pool: its calls are that pool's
            pools[role] = ColocatedRole(role, pools[link.base_role])
    return pools


@serve.deployment(name=COORDINATOR_DEPLOYMENT)
# HTTP requests reach the ASGI app of `__serve_build_asgi_app__`; gRPC calls still reach the
# methods below by name (Serve dispatches the two protocols separately).
@serve.ingress()
class CoordinatorDeployment:
    async def __init__(self, config: dict[str, Any]) -> None:
        from transformers import AutoTokenizer

        from eft_serve.adapters import lora_links, tokenizer_dir
        from eft_serve.cache.factory import build_next_token_cache

        cfg = EftConfig.model_validate(config)
        apply_replica_cpu_settings(cfg.coordinator.replica, "coordinator")
        # API keys (auth.enabled), loaded first so a bad keys file fails the replica at once;
        # checked in `CoordinatorRpc`, the same as on the plain grpc.aio server.
        # Quotas shared by all replicas through Redis when cache.url is set (auth.quota_store).
        gate = (
            Gate(load_key_store(cfg.auth.keys_file, cfg.auth.keys_env), build_quota_limiter(cfg, QuotaMetrics()))
            if cfg.auth.enabled
            else None
        )
        base_role = cfg.recipes[cfg.coordinator.default_recipe].base
        # Every pool's own tokenizer: one vocabulary (checked at start), but chat prompts are
        # rendered with each model's own chat template. The default recipe's base detokenises.
        # A LoRA role without tokenizer files of its own reads its base's (`eft_serve.adapters`).
        links = lora_links(cfg)
        tokenizers = {role: AutoTokenizer.from_pretrained(tokenizer_dir(cfg, role, links)) for role in cfg.pools}
        tokenizer = tokenizers[base_role]
        wire = PoolWireMetrics()
        pools = coordinator_pools(
            cfg,
            links,
            lambda role: ServePoolClient(
                role, coalesce=cfg.coordinator.coalesce_pool_calls, on_send=functools.partial(wire.sent, role)
            ),
        )
        cache = build_next_token_cache(cfg.cache)
        self._metrics = CacheMetrics(cache)
        # Prometheus metrics always; the access log (JSON lines on stderr, i.e. this replica's Ray log) if on.
        observers: list[Telemetry] = [ServeMetrics(cfg.recipes)]
        if cfg.coordinator.access_log.enabled:
            install_handler()
            observers.append(AccessLog(include_prompt=cfg.coordinator.access_log.include_prompt))
        telemetry = FanOut(observers)
        self._coordinator = EftCoordinator(
            pools, cfg.recipes, tokenizer, cfg.coordinator, cache=cache, telemetry=telemetry, tokenizers=tokenizers
        )
        deadline = time.monotonic() + cfg.coordinator.startup_timeout_s
        while True:
            try:
                await self._coordinator.start()
                break
            except FailedPrecondition as e:
                # A tokenizer mismatch will not fix itself: fail the deployment with one line
                # `eft serve` prints (serve.startup_failure).
                raise marked("coordinator", e) from e
            except Unavailable as e:
                if time.monotonic() > deadline:
                    raise marked("coordinator", e) from e
                log.warning("waiting for model pools: %s", e)
                await asyncio.sleep(1.0)
        self._rpc = CoordinatorRpc(self._coordinator, gate, telemetry)
        self._openai = OpenAIApi(self._coordinator, gate, telemetry) if cfg.http.openai else None
        # What start-up built lives as long as the replica: keep it out of the collector's full
        # passes, which otherwise stall every stream on this loop for their whole duration.
        gc.freeze()

    def __serve_build_asgi_app__(self) -> Any:
        # Called by Serve after __init__: the OpenAI-compatible routes over this replica's coordinator.
        return build_openai_app(self._openai)

    # Serve passes its gRPC context to methods with a `grpc_context` parameter; the boundary
    # sets the status there (Serve's proxy reads it when the method raises).
    @error_boundary(set_on_serve_context)
    async def Generate(self, request, grpc_context) -> AsyncIterator[Any]:  # noqa: N802 (RPC name)
        try:
            async with contextlib.aclosing(
                await self._rpc.generate(request, grpc_context.invocation_metadata())
            ) as stream:
                async for msg in stream:
                    yield msg
        finally:
            self._metrics.export()

    @error_boundary(set_on_serve_context)
    async def Complete(self, request, grpc_context):  # noqa: N802
        try:
            return await self._rpc.complete(request, grpc_context.invocation_metadata())
        finally:
            self._metrics.export()

    @error_boundary(set_on_serve_context)
    async def Score(self, request, grpc_context):  # noqa: N802
        return await self._rpc.score(request, grpc_context.invocation_metadata())

    @error_boundary(set_on_serve_context)
    async def ListModels(self, request, grpc_context):  # noqa: N802
        return self._rpc.list_models(grpc_context.invocation_metadata())

    @error_boundary(set_on_serve_context)
    async def ListRecipes(self, request, grpc_context):  # noqa: N802
        return self._rpc.list_recipes(grpc_context.invocation_metadata())

    def _health(self) -> Any:
        # From the coordinator's cached pool probe (no pool call): SERVING iff every pool
        # answered its last probe.
        report = self._coordinator.health()
        if not report.serving:
            log.warning("health check answered NOT_SERVING: %s", report.detail)
        return health_pb2.HealthCheckResponse(status=health_status(report))

    async def Check(self, request):  # noqa: N802 (grpc.health.v1.Health/Check)
        return self._health()

    async def Watch(self, request) -> AsyncIterator[Any]:  # noqa: N802 (grpc.health.v1.Health/Watch)
        # One update, then the stream ends: holding a replica slot per watcher would starve
        # real requests; watchers re-subscribe (or poll Check) as gRPC health clients do on end.
        yield self._health()

    def __del__(self) -> None:
        # Serve calls this on replica shutdown (and Python may again at collection; sync so that
        # is harmless): stop the background pool probe.
        coordinator = getattr(self, "_coordinator", None)
        if coordinator is not None:
            coordinator.stop_nowait()
