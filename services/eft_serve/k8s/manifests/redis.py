"""The rendered Redis instances: the cache and GCS fault tolerance's store (Deployments, ClusterIP
Services) and the dev-only password Secret they share.

Owns: `redis_deployment` / `redis_service` (cache: LRU, no persistence), `gcs_redis_deployment` /
`gcs_redis_service` (GCS: noeviction, append-only file), `secret_manifest` and `secret_env` (an
env var read from the Redis password Secret, also used by the Ray pods for the cache password).
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
    """The cache: no persistence, LRU eviction when full (every key is re-computable)."""
    r = s.redis
    maxmemory = parse_redis_bytes(r.maxmemory)
    memory = r.memory or to_mi(maxmemory * 1.25 + 32 * 2**20)
    if parse_bytes(memory) < maxmemory * 1.1:
        raise ValueError(f"redis.memory {memory} leaves no headroom above maxmemory {r.maxmemory}")
    args = ["--maxmemory", r.maxmemory, "--maxmemory-policy", r.maxmemory_policy, "--save", "", "--appendonly", "no"]
    return _redis(s, s.redis_service(), "redis", r.image, args, r.cpu, memory, r.node_selector, r.tolerations)


def gcs_redis_deployment(s: StackSettings) -> dict[str, Any]:
    """GCS fault tolerance's store: never evicts (a lost key is lost cluster state) and keeps an
    append-only file, so a restarted Redis container (same pod) comes back with the state."""
    g = s.gcs_redis
    args = ["--maxmemory-policy", "noeviction", "--appendonly", "yes", "--save", ""]
    return _redis(s, s.gcs_redis_service(), "gcs-redis", g.image, args, g.cpu, g.memory, {}, [])


def _redis(
    s: StackSettings,
    name: str,
    component: str,
    image: str,
    args: list[str],
    cpu: str,
    memory: str,
    node_selector: dict[str, str],
    tolerations: list[dict[str, Any]],
) -> dict[str, Any]:
    labels = selector_labels(s, component)
    container = {
        "name": "redis",
        "image": image,
        "imagePullPolicy": s.image_pull_policy,
        # $(VAR) is expanded by the kubelet.
        "args": ["--requirepass", f"$({REDIS_PASSWORD_ENV})", *args],
        "env": [secret_env(REDIS_PASSWORD_ENV, s)],
        "ports": [{"name": "redis", "containerPort": REDIS_PORT, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu, "memory": memory}},
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
    if node_selector:
        pod_spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod_spec["tolerations"] = list(tolerations)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_meta(s, name, component),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            # One instance at a time (two would each think they own the data).
            "strategy": {"type": "Recreate"},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def redis_service(s: StackSettings) -> dict[str, Any]:
    return _service(s, s.redis_service(), "redis")


def gcs_redis_service(s: StackSettings) -> dict[str, Any]:
    return _service(s, s.gcs_redis_service(), "gcs-redis")


def _service(s: StackSettings, name: str, component: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(s, name, component),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(s, component),
            "ports": [{"name": "redis", "port": REDIS_PORT, "targetPort": "redis", "protocol": "TCP"}],
        },
    }
