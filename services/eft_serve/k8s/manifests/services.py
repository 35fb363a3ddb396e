"""The gRPC Service in front of the Serve proxy on the Ray head.

Owns: `grpc_service` (selects only a head whose proxy is serving; h2c app protocol).
Does NOT know: the Redis Service (`manifests.redis`), nor who may reach it (`network_policies`).
"""

from __future__ import annotations

from typing import Any

from eft_serve.config import EftConfig
from eft_serve.k8s.labels import object_meta, selector_labels
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
            # ray.io/serve=true: KubeRay sets it on a head whose Serve proxy answers its probe,
            # so a head that is up but not serving yet gets no traffic.
            "selector": {**selector_labels(s, "ray-head"), "ray.io/serve": "true"},
            "ports": [
                {
                    "name": "grpc",
                    "port": cfg.grpc.port,
                    "targetPort": "grpc",
                    "protocol": "TCP",
                    # Plain-text HTTP/2 (gRPC without TLS), so L7 load balancers balance per call.
                    "appProtocol": "kubernetes.io/h2c",
                }
            ],
        },
    }
