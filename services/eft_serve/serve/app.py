"""Serve application builders and the Serve config rendered from one `EftConfig`.

Owns turning the config tree into Serve applications: one per pool (`pool-<role>`, no route,
so only the coordinator is reachable from outside) and the coordinator (`eft`, route "/", the
only gRPC-proxy endpoint, so clients need no `application` metadata). `serve run
deploy/<file>.yaml` and `eft serve` both end up in these builders.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from eft_serve.config import EftConfig
from eft_serve.serve.names import COORDINATOR_APP, pool_app_name

GRPC_SERVICER_FUNCTIONS = [
    "eft_serve.proto_gen.eft.v1.eft_pb2_grpc.add_EftServiceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
IMPORT_POOL = "eft_serve.serve.app:pool_app"
IMPORT_COORDINATOR = "eft_serve.serve.app:coordinator_app"


def _config_from_args(args: dict[str, Any]) -> EftConfig:
    if "config" not in args:
        raise ValueError("application args need 'config' (an EftConfig mapping)")
    return EftConfig.model_validate(args["config"])


def pool_app(args: dict[str, Any]) -> Application:
    """Builder for `import_path: eft_serve.serve.app:pool_app`, args {role, config}."""
    from eft_serve.serve.pool_deployment import ModelPoolDeployment

    cfg = _config_from_args(args)
    role = args.get("role")
    if role not in cfg.pools:
        raise ValueError(f"args.role {role!r} is not a pool; pools: {sorted(cfg.pools)}")
    pool = cfg.pools[role]
    return ModelPoolDeployment.options(**pool.replica.deployment_options()).bind(role, pool.model_dump(mode="json"))


def coordinator_app(args: dict[str, Any]) -> Application:
    """Builder for `import_path: eft_serve.serve.app:coordinator_app`, args {config}."""
    from eft_serve.serve.coordinator_deployment import CoordinatorDeployment

    cfg = _config_from_args(args)
    return CoordinatorDeployment.options(**cfg.coordinator.replica.deployment_options()).bind(
        cfg.model_dump(mode="json")
    )


def serve_config(cfg: EftConfig, http_port: int = 8000) -> dict[str, Any]:
    """The Serve config file (`serve deploy` / `serve run` / KubeRay `serveConfigV2`) for `cfg`."""
    config = cfg.model_dump(mode="json")
    apps: list[dict[str, Any]] = [
        {"name": pool_app_name(role), "route_prefix": None, "import_path": IMPORT_POOL,
         "args": {"role": role, "config": config}}
        for role in cfg.pools
    ]
    apps.append({"name": COORDINATOR_APP, "route_prefix": "/", "import_path": IMPORT_COORDINATOR,
                 "args": {"config": config}})
    grpc: dict[str, Any] = {"port": cfg.grpc.port, "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS}
    if cfg.grpc.request_timeout_s:
        grpc["request_timeout_s"] = cfg.grpc.request_timeout_s
    return {
        # One proxy: on one machine every node's proxy would bind the same port.
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": http_port},
        "grpc_options": grpc,
        "applications": apps,
    }
