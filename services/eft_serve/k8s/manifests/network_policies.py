"""Ingress NetworkPolicies of a release: Ray-internal, gRPC front, KubeRay operator, metrics, both Redis.

Owns: `network_policies`. Does NOT know: the objects the policies protect (built elsewhere);
egress is deliberately open.
"""

from __future__ import annotations

from typing import Any

from eft_serve.config import EftConfig
from eft_serve.k8s.constants import DASHBOARD_PORT, METRICS_PORT, REDIS_PORT, SERVE_HTTP_PORT
from eft_serve.k8s.labels import object_meta, ray_pod_selector, selector_labels
from eft_serve.k8s.settings import StackSettings

# KubeRay labels the Job that deletes a deleted cluster's GCS keys from Redis with this.
REDIS_CLEANUP_LABELS = {"ray.io/node-type": "redis-cleanup"}


def _tcp(*ports: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": p} for p in ports]


def _namespace(name: str) -> dict[str, Any]:
    return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}


def grpc_peers(s: StackSettings) -> list[dict[str, Any]] | None:
    """Who may open the gRPC port: the TLS front's controller only when there is one (TLS ends
    there, and nothing else may bypass it in plain text); else `network.grpc_clients` (None = anyone)."""
    if s.tls_front.enabled:
        return [_namespace(s.tls_front.controller_namespace)]
    return None if s.network.grpc_clients is None else list(s.network.grpc_clients)


def network_policies(cfg: EftConfig, s: StackSettings, redis: bool) -> list[dict[str, Any]]:
    """Ingress only: Ray's ports (GCS, raylet, object manager, workers, dashboard, client) and
    both Redis are reachable from this release's Ray pods; from outside, the gRPC port (on every
    Ray pod: each runs a proxy) from the TLS front only, the metrics port from monitoring, and two
    head ports for the KubeRay operator. Egress stays open (DNS, the API server for the autoscaler,
    model downloads are not ours to guess)."""
    head = {"matchLabels": selector_labels(s, "ray-head")}
    ray_pods = ray_pod_selector(s)
    pol: list[dict[str, Any]] = []

    def policy(name: str, pods: dict[str, Any], ingress: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": object_meta(s, f"{s.release}-{name}", "network-policy"),
            "spec": {"podSelector": pods, "policyTypes": ["Ingress"], "ingress": ingress},
        }

    # Every port: Ray picks worker and object-manager ports dynamically.
    pol.append(policy("ray-internal", ray_pods, [{"from": [{"podSelector": ray_pods}]}]))
    grpc_rule: dict[str, Any] = {"ports": _tcp(cfg.grpc.port)}
    peers = grpc_peers(s)
    if peers is not None:
        grpc_rule["from"] = peers
    pol.append(policy("grpc-clients", ray_pods, [grpc_rule]))
    # Dashboard: serveConfigV2 submission and app status; serve: the proxy health probe.
    operator = _namespace(s.network.kuberay_operator_namespace)
    pol.append(policy("kuberay-operator", head, [{"from": [operator], "ports": _tcp(DASHBOARD_PORT, SERVE_HTTP_PORT)}]))
    scrapers = ([_namespace(s.monitoring.namespace)] if s.monitoring.pod_monitor else []) + list(
        s.network.metrics_scrapers
    )
    if scrapers:
        pol.append(policy("metrics", ray_pods, [{"from": scrapers, "ports": _tcp(METRICS_PORT)}]))
    if redis:
        pol.append(
            policy(
                "redis",
                {"matchLabels": selector_labels(s, "redis")},
                [{"from": [{"podSelector": ray_pods}], "ports": _tcp(REDIS_PORT)}],
            )
        )
    if s.gcs_redis.enabled and s.gcs_redis.deploy:
        # The GCS runs on the head; KubeRay's cleanup Job removes a deleted cluster's keys.
        pol.append(
            policy(
                "gcs-redis",
                {"matchLabels": selector_labels(s, "gcs-redis")},
                [
                    {
                        "from": [{"podSelector": head}, {"podSelector": {"matchLabels": dict(REDIS_CLEANUP_LABELS)}}],
                        "ports": _tcp(REDIS_PORT),
                    }
                ],
            )
        )
    return pol
