"""Serve application builders and the Serve config rendered from one `EftConfig`.

Owns turning the config tree into Serve applications: one per pool (`pool-<role>`, no route,
none for a LoRA role co-located in its base's pool,
so only the coordinator is reachable from outside) and the coordinator (`eft`, route "/", the
only gRPC-proxy endpoint, so clients need no `application` metadata). `serve run
deploy/<file>.yaml` and `eft serve` both end up in these builders.

Also owns the proxy's bounds: its request timeout (`proxy_request_timeout_s`, in the Serve
config) and its largest message (`proxy_env`): Ray Serve 2.60's `gRPCOptions` has no message
size field — the proxy builds its server with `RAY_SERVE_GRPC_MAX_MESSAGE_SIZE` (default 2 GiB)
read from its own process environment at import, so the variable must be set where the head
node's Ray starts (`eft serve` sets it before starting Ray; the Kubernetes head pod gets it as
container env).
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from eft_serve.config import EftConfig, PoolConfig
from eft_serve.serve.names import COORDINATOR_APP, pool_app_name

GRPC_SERVICER_FUNCTIONS = [
    "eft_serve.proto_gen.eft.v1.eft_pb2_grpc.add_EftServiceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
IMPORT_POOL = "eft_serve.serve.app:pool_app"
IMPORT_COORDINATOR = "eft_serve.serve.app:coordinator_app"
# The pools' request router when `kv_affinity` is on (Serve imports it where handles route).
KV_AFFINITY_ROUTER = "eft_serve.serve.kv_affinity_router:KvAffinityRouter"
# The environment variable Serve's proxy reads its gRPC max send/receive message size from.
GRPC_MAX_MESSAGE_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"
# The proxy's timeout sits above the largest request timeout, so the request's own deadline
# (DEADLINE_EXCEEDED with a message) always fires first; the proxy's is the backstop.
PROXY_TIMEOUT_MARGIN_S = 30.0


def proxy_request_timeout_s(cfg: EftConfig) -> float:
    """The gRPC proxy's end-to-end request timeout: `grpc.request_timeout_s`, else the largest
    request timeout plus a margin."""
    return cfg.grpc.request_timeout_s or cfg.coordinator.max_timeout_s + PROXY_TIMEOUT_MARGIN_S


def proxy_env(cfg: EftConfig) -> dict[str, str]:
    """Environment the Serve proxy's process needs (set where the head node's Ray starts)."""
    return {GRPC_MAX_MESSAGE_ENV: str(cfg.grpc.max_message_bytes)}


def _config_from_args(args: dict[str, Any]) -> EftConfig:
    if "config" not in args:
        raise ValueError("application args need 'config' (an EftConfig mapping)")
    return EftConfig.model_validate(args["config"])


def pool_app(args: dict[str, Any]) -> Application:
    """Builder for `import_path: eft_serve.serve.app:pool_app`, args {role, pool: PoolConfig, and
    for LoRA (`pool_apps`) lora: {base_model: <the base's model>} or {adapters: {role: dir}}}."""
    from eft_serve.serve.pool_deployment import ModelPoolDeployment

    role = args.get("role")
    if not role or "pool" not in args:
        raise ValueError("pool application args need 'role' and 'pool' (a PoolConfig mapping)")
    pool = PoolConfig.model_validate(args["pool"])
    lora = args.get("lora") or {}
    if not isinstance(lora, dict) or set(lora) - {"base_model", "adapters"}:
        raise ValueError("pool application args 'lora' takes base_model and/or adapters only")
    return ModelPoolDeployment.options(**pool_deployment_options(pool)).bind(role, pool.model_dump(mode="json"), lora)


def pool_apps(cfg: EftConfig, check_files: bool = True) -> list[dict[str, Any]]:
    """The pool applications' args, one per pool with a deployment of its own: a co-located LoRA
    role has none (its adapter rides in its base's pool, listed there under lora.adapters)."""
    from eft_serve.adapters import lora_links

    links = lora_links(cfg, check_files)
    apps = []
    for role, pool in cfg.pools.items():
        link = links.get(role)
        if link is not None and link.colocated:
            continue
        args: dict[str, Any] = {"role": role, "pool": pool.model_dump(mode="json")}
        if link is not None:
            args["lora"] = {"base_model": cfg.pools[link.base_role].model}
        hosted = {r: str(k.adapter_dir) for r, k in links.items() if k.colocated and k.base_role == role}
        if hosted:
            args["lora"] = {"adapters": hosted}
        apps.append(args)
    return apps


def pool_deployment_options(pool: PoolConfig) -> dict[str, Any]:
    """`Deployment.options(...)` of a pool: its replica options (a placement group per replica when
    tensor parallel) and, with `kv_affinity`, the router."""
    from eft_serve.serve.tensor_parallel import apply_tensor_parallel

    # Per-call access lines are off by default: a pool is called once per token per stream.
    options = apply_tensor_parallel(pool, pool.replica.deployment_options(access_log_default=False))
    if pool.kv_affinity:
        options["request_router_config"] = {"request_router_class": KV_AFFINITY_ROUTER}
    return options


def coordinator_app(args: dict[str, Any]) -> Application:
    """Builder for `import_path: eft_serve.serve.app:coordinator_app`, args {config}."""
    from eft_serve.serve.coordinator_deployment import CoordinatorDeployment

    cfg = _config_from_args(args)
    return CoordinatorDeployment.options(**cfg.coordinator.replica.deployment_options()).bind(
        cfg.model_dump(mode="json")
    )


def serve_config(cfg: EftConfig, http_port: int | None = None) -> dict[str, Any]:
    """The Serve config file (`serve deploy` / `serve run` / KubeRay `serveConfigV2`) for `cfg`.

    The HTTP proxy (the OpenAI-compatible API) listens on `cfg.http`; `http_port` overrides its port.
    """
    config = cfg.model_dump(mode="json")
    apps: list[dict[str, Any]] = [
        {"name": pool_app_name(args["role"]), "route_prefix": None, "import_path": IMPORT_POOL, "args": args}
        for args in pool_apps(cfg, check_files=False)
    ]
    apps.append(
        {"name": COORDINATOR_APP, "route_prefix": "/", "import_path": IMPORT_COORDINATOR, "args": {"config": config}}
    )
    grpc: dict[str, Any] = {
        "port": cfg.grpc.port,
        "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS,
        "request_timeout_s": proxy_request_timeout_s(cfg),
    }
    return {
        # One proxy: on one machine every node's proxy would bind the same port.
        "proxy_location": "HeadOnly",
        "http_options": {"host": cfg.http.host, "port": cfg.http.port if http_port is None else http_port},
        "grpc_options": grpc,
        "applications": apps,
    }


def render_serve_yaml(cfg: EftConfig) -> str:
    """`serve_config` as YAML, fully expanded (no anchors: KubeRay embeds it as a string)."""
    import yaml

    class _NoAliases(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True

    header = "# Generated by `eft render-serve-config --config deploy/demo.yaml`; do not edit by hand.\n"
    return header + yaml.dump(serve_config(cfg), Dumper=_NoAliases, sort_keys=False)
