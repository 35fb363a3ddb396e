"""The KubeRay RayService: serveConfigV2 from the config, a head group and one worker group per pool.

Owns: `k8s_serve_config` (the Serve config as a cluster needs it), `rayservice`, and the Ray
pod pieces (containers, pod specs, env, `ray start` resources, grace periods).
Does NOT know: how Serve runs the apps (`serve.app.serve_config` is the source of
`serveConfigV2`), whether the settings fit the config (`k8s.checks`), nor the other objects.
"""

from __future__ import annotations

import json
from typing import Any

from eft_serve.config import EftConfig, PoolConfig, ReplicaConfig
from eft_serve.k8s.checks import uses_redis
from eft_serve.k8s.constants import (
    CACHE_PASSWORD_ENV,
    CLIENT_PORT,
    DASHBOARD_AGENT_PORT,
    DASHBOARD_PORT,
    GCS_PORT,
    METRICS_PORT,
    NODE_GROUP_RESOURCE_AMOUNT,
    RENDER_MODULE,
    SERVE_HTTP_PORT,
)
from eft_serve.k8s.labels import group_name, object_meta, selector_labels
from eft_serve.k8s.manifests.redis import secret_env
from eft_serve.k8s.settings import PodSettings, StackSettings
from eft_serve.k8s.sizing import pod_counts
from eft_serve.k8s.yaml_dump import dump_yaml
from eft_serve.serve.app import serve_config


def k8s_serve_config(cfg: EftConfig) -> dict[str, Any]:
    """`serve_config(cfg)` for a cluster: the HTTP proxy must listen on the pod IP.

    KubeRay labels the head `ray.io/serve=true` only after probing http://<pod IP>:8000/-/healthz;
    the local default (127.0.0.1) would keep the RayService from ever becoming ready.
    """
    sc = serve_config(cfg, http_port=SERVE_HTTP_PORT)
    sc["http_options"] = {**sc["http_options"], "host": "0.0.0.0"}
    return sc


def _ray_start_resources(resource: str | None) -> dict[str, str]:
    if not resource:
        return {}
    # Pasted into a bash `ray start` command by KubeRay, hence the single quotes.
    return {"resources": "'" + json.dumps({resource: NODE_GROUP_RESOURCE_AMOUNT}, separators=(",", ":")) + "'"}


def _pod_resources(pod: PodSettings) -> dict[str, Any]:
    amounts: dict[str, Any] = {"cpu": pod.cpu, "memory": pod.memory}
    if pod.gpus:
        amounts[pod.gpu_resource] = pod.gpus
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _ray_container(
    name: str, s: StackSettings, pod: PodSettings, env: list[dict[str, Any]], ports: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    container: dict[str, Any] = {"name": name, "image": s.image, "imagePullPolicy": s.image_pull_policy}
    if ports:
        container["ports"] = ports
    if env:
        container["env"] = env
    container["resources"] = _pod_resources(pod)
    container["securityContext"] = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    # Lets running requests finish and the raylet deregister before the pod goes.
    container["lifecycle"] = {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop"]}}}
    if s.model_volume:
        container["volumeMounts"] = [{"name": "models", "mountPath": s.model_volume.mount_path, "readOnly": True}]
    return container


def _ray_pod_spec(
    s: StackSettings, pod: PodSettings, container: dict[str, Any], grace_s: int, worker: bool
) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if worker:
        # Workers never call the Kubernetes API; the head's autoscaler sidecar does.
        spec["automountServiceAccountToken"] = False
    # The Ray images run as `ray` (uid 1000, gid 100); numeric so runAsNonRoot can be verified.
    spec["securityContext"] = {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 100,
        "fsGroup": 100,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    spec["terminationGracePeriodSeconds"] = grace_s
    spec["containers"] = [container]
    if pod.node_selector:
        spec["nodeSelector"] = dict(pod.node_selector)
    if pod.tolerations:
        spec["tolerations"] = list(pod.tolerations)
    if s.model_volume:
        spec["volumes"] = [
            {"name": "models", "persistentVolumeClaim": {"claimName": s.model_volume.claim_name, "readOnly": True}}
        ]
    return spec


def _common_env(s: StackSettings) -> list[dict[str, Any]]:
    env = [{"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "TOKENIZERS_PARALLELISM", "value": "false"}]
    env += [{"name": k, "value": v} for k, v in sorted(s.extra_env.items())]
    return env


def _grace_s(*replicas: ReplicaConfig) -> int:
    return int(max(60, max(r.graceful_shutdown_timeout_s for r in replicas) + 30))


def rayservice(cfg: EftConfig, s: StackSettings, source: str) -> dict[str, Any]:
    head_resource = cfg.coordinator.replica.node_group_resource
    password_env = [secret_env(CACHE_PASSWORD_ENV, s)] if uses_redis(cfg) and cfg.cache.password_env else []
    # The coordinator needs the cache password; pinned to the head, only the head gets it.
    head_env = _common_env(s) + password_env
    worker_env = _common_env(s) + ([] if head_resource else password_env)
    head_ports = [
        {"name": "gcs-server", "containerPort": GCS_PORT, "protocol": "TCP"},
        {"name": "dashboard", "containerPort": DASHBOARD_PORT, "protocol": "TCP"},
        {"name": "client", "containerPort": CLIENT_PORT, "protocol": "TCP"},
        {"name": "serve", "containerPort": SERVE_HTTP_PORT, "protocol": "TCP"},
        {"name": "grpc", "containerPort": cfg.grpc.port, "protocol": "TCP"},
        {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
    ]
    head_container = _ray_container("ray-head", s, s.head, head_env, head_ports)
    head_start = {
        "num-cpus": str(s.head.ray_num_cpus()),
        "num-gpus": "0",
        "dashboard-host": "0.0.0.0",
        **_ray_start_resources(head_resource),
    }
    head = {
        "rayStartParams": head_start,
        "template": {
            "metadata": {"labels": selector_labels(s, "ray-head")},
            "spec": _ray_pod_spec(s, s.head, head_container, _grace_s(cfg.coordinator.replica), worker=False),
        },
    }
    workers = [_worker_group(role, pool, s.pools[role], s, worker_env) for role, pool in cfg.pools.items()]
    header = f"# Generated from {source} by {RENDER_MODULE}; do not edit by hand.\n"
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": object_meta(s, s.release, "rayservice"),
        "spec": {
            "serveConfigV2": header + dump_yaml(k8s_serve_config(cfg)),
            "rayClusterConfig": {
                "rayVersion": s.ray_version,
                # Serve asks for replicas; the autoscaler adds worker pods of the group whose
                # node-group resource the pending replicas need.
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {
                    "upscalingMode": "Default",
                    "idleTimeoutSeconds": s.autoscaler_idle_timeout_s,
                    "imagePullPolicy": s.image_pull_policy,
                    "resources": {
                        "requests": {"cpu": "500m", "memory": "512Mi"},
                        "limits": {"cpu": "500m", "memory": "512Mi"},
                    },
                },
                "headGroupSpec": head,
                "workerGroupSpecs": workers,
            },
        },
    }


def _worker_group(
    role: str, pool: PoolConfig, pod: PodSettings, s: StackSettings, env: list[dict[str, Any]]
) -> dict[str, Any]:
    low, initial, high = pod_counts(pool.replica, pod)
    start = {
        "num-cpus": str(pod.ray_num_cpus()),
        "num-gpus": str(pod.gpus),
        **_ray_start_resources(pool.replica.node_group_resource),
    }
    container = _ray_container("ray-worker", s, pod, env)
    # Our own readiness probe (raylet + agent health), so KubeRay does not inject its RayService
    # default, which also probes a Serve proxy on :8000. With proxy_location HeadOnly workers run
    # no proxy, and that probe would keep every worker NotReady (and its PDB never satisfied).
    container["readinessProbe"] = {
        "httpGet": {"path": "/api/healthz", "port": DASHBOARD_AGENT_PORT},
        "initialDelaySeconds": 10,
        "periodSeconds": 5,
        "timeoutSeconds": 2,
        "failureThreshold": 10,
    }
    return {
        "groupName": group_name(role),
        "replicas": initial,
        "minReplicas": low,
        "maxReplicas": high,
        "rayStartParams": start,
        "template": {
            "metadata": {"labels": selector_labels(s, "ray-worker", role)},
            "spec": _ray_pod_spec(s, pod, container, _grace_s(pool.replica), worker=True),
        },
    }
