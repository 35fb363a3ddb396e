"""The rendered Redis (cache): its Deployment, ClusterIP Service and dev-only password Secret.

Owns: `redis_deployment`, `redis_service`, `secret_manifest` and `secret_env` (an env var read
from the Redis password Secret, also used by the Ray pods for the cache password).
Does NOT know: whether the config uses Redis at all (`checks.uses_redis`), nor the Ray pods.
"""

from __future__ import annotations

from typing import Any

from eft_serve.k8s.constants import PART_OF, REDIS_PASSWORD_ENV, REDIS_PORT
from eft_serve.k8s.labels import object_meta, selector_labels
from eft_serve.k8s.quantities import parse_bytes, parse_redis_bytes, to_mi
from eft_serve.k8s.settings import StackSettings


def secret_manifest(name: str, key: str, value: str, namespace: str | None, release: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    meta["labels"] = {
        "app.kubernetes.io/part-of": PART_OF,
        "app.kubernetes.io/instance": release,
        "app.kubernetes.io/component": "redis",
    }
    meta["annotations"] = {"eft-serve.io/note": "dev only: a password committed to git is no secret"}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "Opaque", "stringData": {key: value}}


def secret_env(name: str, s: StackSettings) -> dict[str, Any]:
    """Env var `name` holding the Redis password from the release's Secret."""
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": s.redis_secret(), "key": s.redis.secret_key}}}


def redis_deployment(s: StackSettings) -> dict[str, Any]:
    r = s.redis
    maxmemory = parse_redis_bytes(r.maxmemory)
    memory = r.memory or to_mi(maxmemory * 1.25 + 32 * 2**20)
    if parse_bytes(memory) < maxmemory * 1.1:
        raise ValueError(f"redis.memory {memory} leaves no headroom above maxmemory {r.maxmemory}")
    labels = selector_labels(s, "redis")
    container = {
        "name": "redis",
        "image": r.image,
        "imagePullPolicy": s.image_pull_policy,
        # A cache: no persistence, evict by LRU when full. $(VAR) is expanded by the kubelet.
        "args": [
            "--requirepass",
            f"$({REDIS_PASSWORD_ENV})",
            "--maxmemory",
            r.maxmemory,
            "--maxmemory-policy",
            r.maxmemory_policy,
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        "env": [secret_env(REDIS_PASSWORD_ENV, s)],
        "ports": [{"name": "redis", "containerPort": REDIS_PORT, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": r.cpu, "memory": memory}, "limits": {"cpu": r.cpu, "memory": memory}},
        "readinessProbe": {
            "exec": {
                "command": ["sh", "-c", f'redis-cli --no-auth-warning -a "${REDIS_PASSWORD_ENV}" ping | grep -q PONG']
            },
            "initialDelaySeconds": 2,
            "periodSeconds": 5,
            "timeoutSeconds": 2,
        },
        "livenessProbe": {"tcpSocket": {"port": "redis"}, "initialDelaySeconds": 10, "periodSeconds": 10},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        # 999 = the redis user of the official image.
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 999,
            "runAsGroup": 999,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [{"name": "data", "emptyDir": {}}],
    }
    if r.node_selector:
        pod_spec["nodeSelector"] = dict(r.node_selector)
    if r.tolerations:
        pod_spec["tolerations"] = list(r.tolerations)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_meta(s, s.redis_service(), "redis"),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            # One cache instance at a time; the coordinator treats Redis down as a cache miss.
            "strategy": {"type": "Recreate"},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def redis_service(s: StackSettings) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(s, s.redis_service(), "redis"),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(s, "redis"),
            "ports": [{"name": "redis", "port": REDIS_PORT, "targetPort": "redis", "protocol": "TCP"}],
        },
    }
