"""The KubeRay RayService: serveConfigV2 from the config, a head group, a coordinator group and
one worker group per pool, with GCS fault tolerance — no single pod whose loss stops the service.

Owns: `k8s_serve_config` (the Serve config as a cluster needs it: proxies on every node),
`rayservice`, and the Ray pod pieces (containers, pod specs, env, `ray start` resources, drain on
preStop, read-only root filesystem with writable emptyDirs, grace periods).
Does NOT know: how Serve runs the apps (`serve.app.serve_config` is the source of
`serveConfigV2`), whether the settings fit the config (`k8s.checks`), nor the other objects.
"""

from __future__ import annotations

import json
from typing import Any

from eft_serve.config import EftConfig, ReplicaConfig
from eft_serve.k8s.checks import uses_redis
from eft_serve.k8s.constants import (
    CACHE_PASSWORD_ENV,
    CLIENT_PORT,
    COORDINATOR_GROUP,
    DASHBOARD_PORT,
    GCS_PORT,
    METRICS_PORT,
    NODE_GROUP_RESOURCE_AMOUNT,
    PROXY_HEALTH_PATH,
    RENDER_MODULE,
    SERVE_HTTP_PORT,
    WRITABLE_DIRS,
)
from eft_serve.k8s.labels import coordinator_labels, group_name, object_meta, selector_labels
from eft_serve.k8s.manifests.redis import secret_env
from eft_serve.k8s.settings import PodSettings, StackSettings
from eft_serve.k8s.sizing import pod_counts
from eft_serve.k8s.yaml_dump import dump_yaml
from eft_serve.serve.app import proxy_env, serve_config


def k8s_serve_config(cfg: EftConfig) -> dict[str, Any]:
    """`serve_config(cfg)` for a cluster: proxies on every node, the HTTP proxy on the pod IP.

    EveryNode: each pod hosting a replica (coordinator or pool) runs a proxy, and the gRPC Service
    selects every pod whose proxy is ready, so losing the head loses one proxy, not the service.
    KubeRay probes http://<pod IP>:8000/-/healthz; the local default (127.0.0.1) would never pass.
    """
    sc = serve_config(cfg, http_port=SERVE_HTTP_PORT)
    sc["proxy_location"] = "EveryNode"
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


def container_security_context() -> dict[str, Any]:
    """Pod Security `restricted` (+ a read-only root): what every container we render gets."""
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


def drain_command(drain_s: int) -> list[str]:
    """preStop of a worker pod: ask the GCS to drain this node, then wait while it does.

    Draining (not `ray stop`, which kills every open stream at once): Serve starts replacement
    replicas elsewhere and stops this node's replicas gracefully (their in-flight requests finish
    within `graceful_shutdown_timeout_s`), and the node's proxy fails its health check, so no new
    stream arrives while the open ones finish. Kubernetes sends SIGTERM only after this returns.
    """
    script = (
        "ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION "
        '--reason-message "pod $HOSTNAME is terminating" '
        f"--deadline-remaining-seconds {drain_s} || true; sleep {drain_s}"
    )
    return ["/bin/sh", "-c", script]


def _ray_container(
    name: str,
    s: StackSettings,
    pod: PodSettings,
    env: list[dict[str, Any]],
    pre_stop: list[str],
    ports: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    container: dict[str, Any] = {"name": name, "image": s.image, "imagePullPolicy": s.image_pull_policy}
    if ports:
        container["ports"] = ports
    if env:
        container["env"] = env
    container["resources"] = _pod_resources(pod)
    container["securityContext"] = container_security_context()
    container["lifecycle"] = {"preStop": {"exec": {"command": pre_stop}}}
    # The root filesystem is read-only: Ray's session dir (/tmp/ray) and caches go to emptyDirs.
    mounts: list[dict[str, Any]] = [{"name": vol, "mountPath": path} for vol, path in WRITABLE_DIRS.items()]
    if s.model_volume:
        mounts.append({"name": "models", "mountPath": s.model_volume.mount_path, "readOnly": True})
    container["volumeMounts"] = mounts
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
    volumes: list[dict[str, Any]] = [{"name": vol, "emptyDir": {}} for vol in WRITABLE_DIRS]
    if s.model_volume:
        volumes.append(
            {"name": "models", "persistentVolumeClaim": {"claimName": s.model_volume.claim_name, "readOnly": True}}
        )
    spec["volumes"] = volumes
    return spec


def _common_env(s: StackSettings) -> list[dict[str, Any]]:
    env = [{"name": "HF_HUB_OFFLINE", "value": "1"}, {"name": "TOKENIZERS_PARALLELISM", "value": "false"}]
    env += [{"name": k, "value": v} for k, v in sorted(s.extra_env.items())]
    return env


def config_secret_env(cfg: EftConfig, s: StackSettings) -> list[dict[str, Any]]:
    """The secret env vars the config names (API keys, cache HMAC key), each from the app Secret:
    secrets reach the coordinator pods as env, never through serveConfigV2 (plain text)."""
    names = {
        cfg.auth.keys_env if cfg.auth.enabled else None,
        cfg.cache.hmac_key_env if cfg.cache.enabled else None,
    } - {None}
    return [
        {"name": name, "valueFrom": {"secretKeyRef": {"name": s.app_secret(), "key": name}}}
        for name in sorted(n for n in names if n is not None)
    ]


def _grace_s(s: StackSettings, *replicas: ReplicaConfig) -> int:
    # The drain, then the replicas' own graceful shutdown, then a margin for the raylet to exit.
    return int(s.drain_s + max(r.graceful_shutdown_timeout_s for r in replicas) + 30)


# The head runs no replicas (num-cpus 0), so it has nothing to drain: it waits for the Service
# endpoints to drop it (its proxy stops getting new streams), then goes; with GCS fault tolerance
# the workers keep serving until the new head has taken over.
HEAD_PRE_STOP = ["/bin/sh", "-c", "sleep 15"]


def _gcs_fault_tolerance(s: StackSettings) -> dict[str, Any]:
    return {
        "redisAddress": s.gcs_redis_address(),
        "redisPassword": {"valueFrom": {"secretKeyRef": {"name": s.redis_secret(), "key": s.redis.secret_key}}},
    }


def _proxy_readiness() -> dict[str, Any]:
    # Ready = this pod's Serve proxy answers (it does only where a replica runs, and says 503
    # while the node drains): KubeRay's serve label + readiness select the gRPC endpoints.
    return {
        "httpGet": {"path": PROXY_HEALTH_PATH, "port": SERVE_HTTP_PORT},
        "initialDelaySeconds": 10,
        "periodSeconds": 5,
        "timeoutSeconds": 2,
        "failureThreshold": 3,
    }


def rayservice(cfg: EftConfig, s: StackSettings, source: str) -> dict[str, Any]:
    password_env = [secret_env(CACHE_PASSWORD_ENV, s)] if uses_redis(cfg) and cfg.cache.password_env else []
    ray_ports = [
        {"name": "serve", "containerPort": SERVE_HTTP_PORT, "protocol": "TCP"},
        {"name": "grpc", "containerPort": cfg.grpc.port, "protocol": "TCP"},
        {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
    ]
    head_ports = [
        {"name": "gcs-server", "containerPort": GCS_PORT, "protocol": "TCP"},
        {"name": "dashboard", "containerPort": DASHBOARD_PORT, "protocol": "TCP"},
        {"name": "client", "containerPort": CLIENT_PORT, "protocol": "TCP"},
        *ray_ports,
    ]
    # The Serve proxy (on the head) takes its gRPC message-size cap from its environment only.
    head_env = _common_env(s) + [{"name": k, "value": v} for k, v in sorted(proxy_env(cfg).items())]
    head_container = _ray_container("ray-head", s, s.head, head_env, HEAD_PRE_STOP, head_ports)
    head_start = {
        # No replica ever lands on the head (GCS, Serve controller and a proxy only): losing it
        # loses no coordinator and no pool.
        "num-cpus": "0",
        "num-gpus": "0",
        "dashboard-host": "0.0.0.0",
    }
    head = {
        "rayStartParams": head_start,
        "template": {
            "metadata": {"labels": selector_labels(s, "ray-head")},
            "spec": _ray_pod_spec(s, s.head, head_container, 60, worker=False),
        },
    }
    coordinator = _worker_group(
        COORDINATOR_GROUP,
        cfg.coordinator.replica,
        s.coordinator,
        s,
        _common_env(s) + password_env + config_secret_env(cfg, s),
        ray_ports,
        coordinator_labels(s),
    )
    workers = [coordinator] + [
        _worker_group(
            group_name(role),
            pool.replica,
            s.pools[role],
            s,
            _common_env(s),
            ray_ports,
            selector_labels(s, "ray-worker", role),
        )
        for role, pool in cfg.deployed_pools().items()  # a co-located LoRA role rides in its base's pods
    ]
    header = f"# Generated from {source} by {RENDER_MODULE}; do not edit by hand.\n"
    cluster: dict[str, Any] = {"rayVersion": s.ray_version}
    if s.gcs_redis.enabled:
        cluster["gcsFaultToleranceOptions"] = _gcs_fault_tolerance(s)
    cluster.update(
        {
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
                # Restricted like ours (the pod's runAsNonRoot and seccomp apply to it too).
                "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
            },
            "headGroupSpec": head,
            "workerGroupSpecs": workers,
        }
    )
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": object_meta(s, s.release, "rayservice"),
        "spec": {"serveConfigV2": header + dump_yaml(k8s_serve_config(cfg)), "rayClusterConfig": cluster},
    }


def _worker_group(
    name: str,
    replica: ReplicaConfig,
    pod: PodSettings,
    s: StackSettings,
    env: list[dict[str, Any]],
    ports: list[dict[str, Any]],
    labels: dict[str, str],
) -> dict[str, Any]:
    low, initial, high = pod_counts(replica, pod)
    start = {
        "num-cpus": str(pod.ray_num_cpus()),
        "num-gpus": str(pod.gpus),
        **_ray_start_resources(replica.node_group_resource),
    }
    container = _ray_container("ray-worker", s, pod, env, drain_command(s.drain_s), ports)
    container["readinessProbe"] = _proxy_readiness()
    return {
        "groupName": name,
        "replicas": initial,
        "minReplicas": low,
        "maxReplicas": high,
        "rayStartParams": start,
        "template": {
            "metadata": {"labels": labels},
            "spec": _ray_pod_spec(s, pod, container, _grace_s(s, replica), worker=True),
        },
    }
