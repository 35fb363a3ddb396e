"""Running the whole stack on a Ray cluster: start (or join) Ray, deploy every app, tear down.

Owns the order of deployment (pools first, concurrently; then the coordinator, whose start-up
checks the pools' vocabularies) and stopping only what it started: Serve apps via the Serve API
and a Ray instance via `ray.shutdown()` of the driver that started it — never `ray stop`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from eft_serve.config import EftConfig
from eft_serve.preflight import StartupError
from eft_serve.serve.app import (
    GRPC_SERVICER_FUNCTIONS,
    coordinator_app,
    pool_app,
    pool_apps,
    proxy_env,
    proxy_request_timeout_s,
)
from eft_serve.serve.loopback_grpc import runtime_env as grpc_proxy_runtime_env
from eft_serve.serve.names import COORDINATOR_APP, pool_app_name
from eft_serve.serve.startup_failure import cause_in

# Where a local stack's plaintext gRPC proxy listens (`loopback_grpc`); clients and the TLS front dial it.
LOCAL_GRPC_HOST = "127.0.0.1"


def ensure_ray_env() -> None:
    # A stray token file would turn auth on for some processes only: say it explicitly.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def start_local_ray(cfg: EftConfig) -> bool:
    """Connect to `cfg.ray.address` or start a local Ray instance; returns True if we started one."""
    import ray

    ensure_ray_env()
    # Read by the Serve proxy when it starts (inherited from the Ray processes started here); an
    # operator's own value wins.
    for name, value in proxy_env(cfg).items():
        os.environ.setdefault(name, value)
    if ray.is_initialized():
        return False
    # Worker output stays in Ray's log files (log_to_driver); the driver's "ray" logger keeps the
    # handlers it has (`eft` commands route them to their log file, see `eft_serve.console`).
    kwargs: dict = {
        "namespace": cfg.ray.namespace,
        "include_dashboard": False,
        "log_to_driver": False,
        "configure_logging": False,
    }
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, **kwargs)
        return False
    # address="local" always starts a fresh instance: a bare ray.init() would attach to whatever
    # cluster /tmp/ray last recorded (another user's, or a dead one, where it then hangs).
    ray.init(
        address="local",
        _node_ip_address=cfg.ray.node_ip_address,
        num_cpus=local_num_cpus(cfg),
        _temp_dir=cfg.ray.temp_dir,
        # Serve's gRPC proxy would listen on [::] (no host option): keep the plaintext port on
        # loopback; the TLS front (tls.*) is how it is reached from elsewhere.
        runtime_env=grpc_proxy_runtime_env(LOCAL_GRPC_HOST),
        **kwargs,
    )
    return True


def local_num_cpus(cfg: EftConfig) -> int:
    """Logical CPUs for a one-machine Ray: at least what every replica asks for at full scale.

    Replicas run torch on one thread each and Ray CPUs are only accounting, so on a small machine
    the stack may oversubscribe rather than leave a pool unschedulable (which would hang start-up).
    """
    if cfg.ray.num_cpus is not None:
        return cfg.ray.num_cpus

    def most(replica) -> float:
        n = replica.autoscaling.max_replicas if replica.autoscaling else replica.num_replicas
        return n * replica.num_cpus

    wanted = sum(most(p.replica) for p in cfg.pools.values()) + most(cfg.coordinator.replica)
    return max(os.cpu_count() or 1, math.ceil(wanted))


def deploy_stack(cfg: EftConfig, http_port: int | None = None, log: Callable[[str], None] = print) -> None:
    """Start Serve with the gRPC and HTTP proxies and deploy every pool and the coordinator.

    The HTTP proxy (OpenAI-compatible API) listens on `cfg.http`; `http_port` overrides its port.
    """
    from ray import serve
    from ray.serve.config import HTTPOptions, gRPCOptions

    serve.start(
        proxy_location="HeadOnly",
        http_options=HTTPOptions(host=cfg.http.host, port=cfg.http.port if http_port is None else http_port),
        grpc_options=gRPCOptions(
            port=cfg.grpc.port,
            grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS,
            request_timeout_s=proxy_request_timeout_s(cfg),
        ),
    )
    args = {"config": cfg.model_dump(mode="json")}
    started = time.perf_counter()
    # All pools in one call so they load their models concurrently; wait_for_apps reports failures.
    # One app per pool with a deployment of its own (a co-located LoRA role rides in its base's);
    # adapters are linked to their bases (and checked) here, before anything deploys.
    pools = pool_apps(cfg)
    serve.run_many(
        [serve.RunTarget(pool_app(a), name=pool_app_name(a["role"]), route_prefix=None) for a in pools],
        wait_for_ingress_deployment_creation=False,
        wait_for_applications_running=False,
    )
    for pool_args in pools:
        role = pool_args["role"]
        hosted = sorted((pool_args.get("lora") or {}).get("adapters") or {})
        log(f"deploying pool {role!r} ({cfg.pools[role].model})" + (f" with LoRA roles {hosted}" if hosted else ""))
    wait_for_apps([pool_app_name(a["role"]) for a in pools], timeout_s=cfg.coordinator.startup_timeout_s)
    log(f"pools ready in {time.perf_counter() - started:.1f}s; deploying the coordinator")
    try:
        serve.run(coordinator_app(args), name=COORDINATOR_APP, route_prefix="/")
    except RuntimeError as e:
        # Serve says only "Failed to update the deployments"; the replica's marked cause is in
        # the application's status.
        raise _startup_error(COORDINATOR_APP, str(e)) from e
    log(f"stack ready in {time.perf_counter() - started:.1f}s; gRPC on port {cfg.grpc.port}")


def _startup_error(app_name: str, fallback: str) -> StartupError:
    """One line for a failed application: its replica's marked cause, else Serve's last words."""
    from ray import serve

    messages = [fallback]
    try:
        app = serve.status().applications.get(app_name)
        if app is not None:
            messages = [app.message or "", *(d.message or "" for d in app.deployments.values()), fallback]
    except Exception:  # noqa: BLE001 - a status that cannot be read leaves the fallback message
        pass
    for message in messages:
        if cause := cause_in(message):
            return StartupError(cause)
    last = next((line.strip() for m in messages for line in reversed(m.splitlines()) if line.strip()), "")
    return StartupError(f"application {app_name!r} failed to deploy: {last[:500]}")


def wait_for_apps(names: list[str], timeout_s: float) -> None:
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    deadline = time.monotonic() + timeout_s
    while True:
        statuses = serve.status().applications
        pending = []
        for name in names:
            app = statuses.get(name)
            if app is not None and app.status == ApplicationStatus.DEPLOY_FAILED:
                raise _startup_error(name, app.message)
            if app is None or app.status != ApplicationStatus.RUNNING:
                pending.append(name)
        if not pending:
            return
        if time.monotonic() > deadline:
            raise not_running_error(pending, statuses, timeout_s)
        time.sleep(0.5)


def _one_line(text: str | None, limit: int = 200) -> str:
    words = " ".join((text or "").split())
    return words if len(words) <= limit else words[: limit - 1] + "…"


def _state(value: Any) -> str:
    return str(getattr(value, "value", value))


def not_running_error(pending: list[str], statuses: Mapping[str, Any], timeout_s: float) -> StartupError:
    """One line for the applications still not running when start-up gives up: each one's state
    and its deployments' (Serve's `ApplicationStatusOverview`s, messages flattened and cut short)."""
    parts = []
    for name in pending:
        app = statuses.get(name)
        if app is None:
            parts.append(f"{name} (not deployed)")
            continue
        said = _one_line(app.message)
        deployments = ", ".join(
            f"{d} {_state(ds.status)}" + (f": {_one_line(ds.message)}" if ds.message else "")
            for d, ds in app.deployments.items()
        )
        parts.append(
            f"{name} ({_state(app.status)}{': ' + said if said else ''}{'; ' + deployments if deployments else ''})"
        )
    return StartupError(
        f"applications still not running after {timeout_s:.0f}s: {'; '.join(parts)}; "
        "raise coordinator.startup_timeout_s if the models are still loading, else see the Ray logs"
    )


def teardown(started_ray: bool) -> None:
    import ray
    from ray import serve

    # Without a Ray connection serve.shutdown() would try to connect (and could start or hang).
    if not ray.is_initialized():
        return
    try:
        serve.shutdown()
    finally:
        if started_ray:
            ray.shutdown()
