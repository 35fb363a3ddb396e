"""Ingress NetworkPolicies of a release: Ray-internal, gRPC clients, KubeRay operator, metrics, Redis.

Owns: `network_policies` and the selector of all Ray pods of a release.
Does NOT know: the objects the policies protect (built elsewhere); egress is deliberately open.
"""

from __future__ import annotations

from typing import Any

from eft_serve.config import EftConfig
from eft_serve.k8s.constants import DASHBOARD_PORT, METRICS_PORT, PART_OF, REDIS_PORT, SERVE_HTTP_PORT
from eft_serve.k8s.labels import object_meta, selector_labels
from eft_serve.k8s.settings import StackSettings


def _ray_pods(s: StackSettings) -> dict[str, Any]:
    return {
        "matchLabels": {"app.kubernetes.io/part-of": PART_OF, "app.kubernetes.io/instance": s.release},
        "matchExpressions": [
            {"key": "app.kubernetes.io/component", "operator": "In", "values": ["ray-head", "ray-worker"]}
        ],
    }


def _tcp(*ports: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": p} for p in ports]


def network_policies(cfg: EftConfig, s: StackSettings, redis: bool) -> list[dict[str, Any]]:
    """Ingress only: Ray's ports (GCS, raylet, object manager, workers, dashboard, client) and
    Redis are reachable from this release's Ray pods; from outside, the gRPC port only, plus the
    two head ports the KubeRay operator needs. Egress stays open (DNS, the API server for the
    autoscaler, model downloads are not ours to guess)."""
    head = {"matchLabels": selector_labels(s, "ray-head")}
    pol: list[dict[str, Any]] = []

    def policy(name: str, pods: dict[str, Any], ingress: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": object_meta(s, f"{s.release}-{name}", "network-policy"),
            "spec": {"podSelector": pods, "policyTypes": ["Ingress"], "ingress": ingress},
        }

    # Every port: Ray picks worker and object-manager ports dynamically.
    pol.append(policy("ray-internal", _ray_pods(s), [{"from": [{"podSelector": _ray_pods(s)}]}]))
    grpc_rule: dict[str, Any] = {"ports": _tcp(cfg.grpc.port)}
    if s.network.grpc_clients is not None:
        grpc_rule["from"] = list(s.network.grpc_clients)
    pol.append(policy("grpc-clients", head, [grpc_rule]))
    operator = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": s.network.kuberay_operator_namespace}}
    }
    # Dashboard: serveConfigV2 submission and app status; serve: the proxy health probe.
    pol.append(policy("kuberay-operator", head, [{"from": [operator], "ports": _tcp(DASHBOARD_PORT, SERVE_HTTP_PORT)}]))
    if s.network.metrics_scrapers:
        pol.append(
            policy("metrics", _ray_pods(s), [{"from": list(s.network.metrics_scrapers), "ports": _tcp(METRICS_PORT)}])
        )
    if redis:
        pol.append(
            policy(
                "redis",
                {"matchLabels": selector_labels(s, "redis")},
                [{"from": [{"podSelector": _ray_pods(s)}], "ports": _tcp(REDIS_PORT)}],
            )
        )
    return pol
