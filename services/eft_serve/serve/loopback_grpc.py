"""Make Ray Serve's gRPC proxy listen on one host (loopback for `eft serve`) instead of `[::]`.

Ray Serve 2.60 hard-codes `[::]:<port>` for its gRPC proxy (`grpc_util.start_grpc_server` via
`default_impl.add_grpc_address`) and has no host option; unwrapped, a local `eft serve` would be
reachable from every interface although it prints 127.0.0.1. `runtime_env()` is the job-level runtime env that
`serve.local.start_local_ray` passes to `ray.init`: every worker of the job — the Serve controller,
its proxy actors and the replicas — runs `bind_grpc_proxy_host` at start-up, which wraps
`add_grpc_address` so that `[::]:<port>` becomes `<host>:<port>`.
Does NOT apply to a cluster we join (`ray.address`) or Kubernetes, where the proxy must listen on
the pod IP and NetworkPolicies decide who reaches it.
"""

from __future__ import annotations

import os
from typing import Any

HOST_ENV = "EFT_GRPC_PROXY_HOST"
# Ray loads the hook by dotted path (module.function), not "module:function".
HOOK = "eft_serve.serve.loopback_grpc.bind_grpc_proxy_host"


def runtime_env(host: str) -> dict[str, Any]:
    """Job runtime env for `ray.init` that binds Serve's gRPC proxy to `host`."""
    return {"worker_process_setup_hook": HOOK, "env_vars": {HOST_ENV: host}}


def rewrite_address(address: str, host: str) -> str:
    """`[::]:9000` -> `host:9000`; any other address is left alone."""
    if address.startswith("[::]:"):
        return f"{host}:{address.rsplit(':', 1)[1]}"
    return address


def bind_grpc_proxy_host() -> None:
    """Ray worker setup hook: patch Serve's gRPC address helper in this worker process."""
    host = os.environ.get(HOST_ENV)
    if not host:
        return
    from ray.serve._private import default_impl

    original = default_impl.add_grpc_address
    if getattr(original, "_eft_host", None) == host:
        return  # already patched in this process

    def add_grpc_address(grpc_server: Any, server_address: str) -> None:
        original(grpc_server, rewrite_address(server_address, host))

    add_grpc_address._eft_host = host  # type: ignore[attr-defined]
    default_impl.add_grpc_address = add_grpc_address
