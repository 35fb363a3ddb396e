"""The TLS front: an ingress-nginx Ingress that terminates TLS (mTLS optional) and speaks gRPC
(plain HTTP/2) to the Serve proxies behind the gRPC Service.

Owns: `grpc_ingress` — certificate from a `kubernetes.io/tls` Secret, `backend-protocol: GRPC`,
request size and read/send timeouts tied to the request timeout (so the server's own
DEADLINE_EXCEEDED reaches the client before nginx gives up), client-certificate verification
when `tls_front.client_ca_secret` is set.
Does NOT know: the certificate itself (made out of band, e.g. cert-manager), nor the
NetworkPolicy that lets only the controller's namespace reach the gRPC port (`network_policies`).
"""

from __future__ import annotations

import math
from typing import Any

from eft_serve.config import EftConfig
from eft_serve.k8s.labels import object_meta
from eft_serve.k8s.settings import StackSettings

NGINX = "nginx.ingress.kubernetes.io"
# Slack over the request timeout: the coordinator answers DEADLINE_EXCEEDED first.
TIMEOUT_SLACK_S = 10


def read_timeout_s(cfg: EftConfig) -> int:
    """Longest silence nginx accepts from the backend (between two streamed messages)."""
    return math.ceil((cfg.grpc.request_timeout_s or cfg.coordinator.default_timeout_s) + TIMEOUT_SLACK_S)


def grpc_ingress(cfg: EftConfig, s: StackSettings) -> dict[str, Any]:
    t = s.tls_front
    timeout = str(read_timeout_s(cfg))
    annotations = {
        f"{NGINX}/backend-protocol": "GRPC",
        f"{NGINX}/ssl-redirect": "true",
        f"{NGINX}/proxy-body-size": t.max_body_size,
        f"{NGINX}/proxy-read-timeout": timeout,
        f"{NGINX}/proxy-send-timeout": timeout,
    }
    if t.client_ca_secret:
        annotations[f"{NGINX}/auth-tls-secret"] = t.client_ca_secret
        annotations[f"{NGINX}/auth-tls-verify-client"] = "on"
        annotations[f"{NGINX}/auth-tls-verify-depth"] = "3"
    backend = {"service": {"name": f"{s.release}-grpc", "port": {"name": "grpc"}}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": object_meta(s, f"{s.release}-grpc", "tls-front", annotations=annotations),
        "spec": {
            "ingressClassName": t.ingress_class,
            "tls": [{"hosts": [t.host], "secretName": t.secret_name}],
            "rules": [{"host": t.host, "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": backend}]}}],
        },
    }
