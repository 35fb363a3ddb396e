"""The gRPC Service in front of the Serve proxies (one on every Ray pod that hosts a replica).

Owns: `grpc_service` (selects every Ray pod of the release whose proxy is ready; h2c app protocol).
Does NOT know: the Redis Services (`manifests.redis`), the TLS front (`manifests.ingress`), nor
who may reach it (`network_policies`).
"""

from __future__ import annotations

from typing import Any

from eft_serve.config import EftConfig
from eft_serve.k8s.constants import PART_OF
from eft_serve.k8s.labels import object_meta
from eft_serve.k8s.settings import StackSettings


def grpc_service(cfg: EftConfig, s: StackSettings) -> dict[str, Any]:
    meta = object_meta(s, f"{s.release}-grpc", "grpc")
    if s.grpc_service_annotations:
        meta["annotations"] = dict(s.grpc_service_annotations)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "type": s.grpc_service_type,
            # Every Ray pod of the release (proxy_location EveryNode) with ray.io/serve=true:
            # KubeRay sets it on a RayService's workers (their readiness probe — our proxy health
            # check — gates traffic) and flips it on the head as its proxy passes KubeRay's probe.
            "selector": {
                "app.kubernetes.io/part-of": PART_OF,
                "app.kubernetes.io/instance": s.release,
                "ray.io/serve": "true",
            },
            "ports": [
                {
                    "name": "grpc",
                    "port": cfg.grpc.port,
                    "targetPort": "grpc",
                    "protocol": "TCP",
                    # Plain-text HTTP/2 (gRPC without TLS): TLS ends at the front (Ingress).
                    "appProtocol": "kubernetes.io/h2c",
                }
            ],
        },
    }
