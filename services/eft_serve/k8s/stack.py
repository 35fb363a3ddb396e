"""One environment's complete list of manifests, in apply order.

Owns: `render_stack` — derive unset pod GPU counts, check the settings against the config, then call each builder in
`manifests` (Namespace, dev Secret, cache Redis, GCS Redis, RayService, gRPC Service, TLS Ingress,
NetworkPolicies, PDBs, PodMonitor).
Does NOT know: settings files, output directories or YAML text (`files`, `yaml_dump`).
"""

from __future__ import annotations

from typing import Any

from eft_serve.config import EftConfig
from eft_serve.k8s.checks import check_settings, uses_redis
from eft_serve.k8s.manifests.ingress import grpc_ingress
from eft_serve.k8s.manifests.namespace import namespace_manifest
from eft_serve.k8s.manifests.network_policies import network_policies
from eft_serve.k8s.manifests.pdbs import disruption_budgets
from eft_serve.k8s.manifests.pod_monitor import pod_monitor
from eft_serve.k8s.manifests.rayservice import rayservice
from eft_serve.k8s.manifests.redis import (
    gcs_redis_deployment,
    gcs_redis_service,
    redis_deployment,
    redis_service,
    secret_manifest,
)
from eft_serve.k8s.manifests.services import grpc_service
from eft_serve.k8s.settings import StackSettings
from eft_serve.k8s.sizing import with_derived_gpus


def render_stack(cfg: EftConfig, s: StackSettings, source: str) -> list[dict[str, Any]]:
    """All manifests of one environment, in apply order. `source` names the config in headers."""
    s = with_derived_gpus(cfg, s)
    check_settings(cfg, s)
    out: list[dict[str, Any]] = []
    if s.namespace:
        out.append(namespace_manifest(s.namespace))
    redis = uses_redis(cfg) and s.redis.deploy
    gcs_redis = s.gcs_redis.enabled and s.gcs_redis.deploy
    if (redis or gcs_redis) and s.redis.dev_password is not None:
        out.append(secret_manifest(s.redis_secret(), s.redis.secret_key, s.redis.dev_password, s.namespace, s.release))
    if redis:
        out += [redis_deployment(s), redis_service(s)]
    if gcs_redis:
        out += [gcs_redis_deployment(s), gcs_redis_service(s)]
    out.append(rayservice(cfg, s, source))
    out.append(grpc_service(cfg, s))
    if s.tls_front.enabled:
        out.append(grpc_ingress(cfg, s))
    out += network_policies(cfg, s, redis)
    out += disruption_budgets(cfg, s)
    if s.monitoring.pod_monitor:
        out.append(pod_monitor(s))
    return out
