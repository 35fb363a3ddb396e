"""The per-environment settings schema, read from `k8s/settings/<name>.yaml`.

Owns: `StackSettings` (a complete stack: image, pod sizes, node selectors, model volume, Redis,
network peers), `OverlaySettings` (a kustomize overlay on another stack: namespace + dev Secret)
and their own validation (DNS-1123 names, no GPUs on the head, unknown keys are errors).
Does NOT know: the `EftConfig` these settings are checked against (`checks`), where the files
live (`layout`), or how they become manifests (`manifests`).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from eft_serve.k8s.quantities import parse_cpu
from eft_serve.strict_model import StrictModel

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class PodSettings(StrictModel):
    """Size and placement of one kind of Ray pod (requests = limits: Guaranteed QoS, no throttling)."""

    cpu: str = Field(description="Kubernetes CPU quantity, e.g. '4' or '1500m'")
    memory: str = Field(description="Kubernetes memory quantity, e.g. '16Gi'")
    gpus: int = Field(0, ge=0)
    gpu_resource: str = "nvidia.com/gpu"
    # Ray's `num-cpus` for the node; default: the pod's whole CPUs.
    ray_cpus: int | None = Field(None, ge=0)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)

    def cpu_cores(self) -> float:
        return parse_cpu(self.cpu)

    def ray_num_cpus(self) -> int:
        return self.ray_cpus if self.ray_cpus is not None else int(self.cpu_cores())


class RedisSettings(StrictModel):
    # False: the cache url points at a Redis run elsewhere (managed service); nothing is rendered.
    deploy: bool = True
    image: str = "redis:7.4-alpine"
    maxmemory: str = "256mb"
    maxmemory_policy: str = "allkeys-lru"
    cpu: str = "250m"
    # Default: maxmemory + 25 % + 32 MiB (allocator fragmentation, client buffers).
    memory: str | None = None
    secret_name: str | None = None  # default: <release>-redis
    secret_key: str = "password"
    # Renders the Secret with this value. Dev only: a password committed to git is no secret.
    dev_password: str | None = None
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)


class ModelVolume(StrictModel):
    """A pre-provisioned claim holding the model directories, mounted read-only in every Ray pod."""

    claim_name: str
    mount_path: str = "/models"


class NetworkSettings(StrictModel):
    # The KubeRay operator submits serveConfigV2 via the dashboard and probes the Serve proxy.
    kuberay_operator_namespace: str = "kuberay-system"
    # NetworkPolicyPeers allowed to reach the gRPC port; None = any source.
    grpc_clients: list[dict[str, Any]] | None = None
    # NetworkPolicyPeers allowed to scrape Ray's metrics port; empty = nobody outside the release.
    metrics_scrapers: list[dict[str, Any]] = Field(default_factory=list)


class StackSettings(StrictModel):
    """Everything an EftConfig does not say about one Kubernetes environment."""

    config: str = Field(description="EftConfig YAML, relative to the repository root")
    release: str = "eft"
    namespace: str | None = None
    image: str
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    ray_version: str = "2.60.0"
    # Kubernetes version whose schemas `k8s.validate` checks the core objects against.
    kubernetes_version: str = "1.30"
    head: PodSettings
    pools: dict[str, PodSettings]
    model_volume: ModelVolume | None = None
    redis: RedisSettings = Field(default_factory=RedisSettings)
    network: NetworkSettings = Field(default_factory=NetworkSettings)
    grpc_service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    grpc_service_annotations: dict[str, str] = Field(default_factory=dict)
    # KubeRay autoscaler: how long a worker pod stays idle before it is removed.
    autoscaler_idle_timeout_s: int = Field(60, ge=0)
    extra_env: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _names(self) -> StackSettings:
        for what, value in (("release", self.release), ("namespace", self.namespace)):
            if value is not None and not DNS_LABEL.match(value):
                raise ValueError(f"{what} {value!r} is not a DNS-1123 label")
        if self.head.gpus:
            raise ValueError("head.gpus: the head hosts the coordinator and the proxy; give GPUs to pools")
        return self

    def redis_secret(self) -> str:
        return self.redis.secret_name or f"{self.release}-redis"

    def redis_service(self) -> str:
        return f"{self.release}-redis"


class OverlaySettings(StrictModel):
    """A kustomize overlay on another settings file's render (`k8s/base`): namespace + dev Secret."""

    base: str = Field(description="settings name rendered into k8s/base")
    namespace: str
    dev_redis_password: str | None = None

    @model_validator(mode="after")
    def _names(self) -> OverlaySettings:
        if not DNS_LABEL.match(self.namespace):
            raise ValueError(f"namespace {self.namespace!r} is not a DNS-1123 label")
        return self


def parse_settings(data: Any, source: str) -> StackSettings | OverlaySettings:
    """One settings file's YAML data: an overlay when it names a `base`, else a complete stack."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: the top level must be a mapping")
    return OverlaySettings.model_validate(data) if "base" in data else StackSettings.model_validate(data)
