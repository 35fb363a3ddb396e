"""The per-environment settings schema, read from `k8s/settings/<name>.yaml`.

Owns: `StackSettings` (a complete stack: image, pod sizes, node selectors, model volume, Redis,
GCS fault-tolerance Redis, TLS front, monitoring, network peers), `OverlaySettings` (a kustomize
overlay on another stack: namespace + dev Secret) and their own validation (DNS-1123 names, no GPUs on the head, unknown keys are errors).
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
    # None: derived (`sizing.with_derived_gpus`): a pool pod gets what one replica reserves
    # (replica.num_gpus rounded up: the tensor-parallel size of a vLLM TP pool), others none.
    gpus: int | None = Field(None, ge=0)
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


class GcsRedisSettings(StrictModel):
    """GCS fault tolerance: the head's cluster state in a Redis of its own, so a restarted head
    resumes the cluster (workers, proxies and replicas keep serving meanwhile).

    Never the cache's Redis: that one evicts keys by LRU, which would silently drop GCS state.
    The rendered one runs with `noeviction` and an append-only file on its volume.
    """

    enabled: bool = True
    # False: `address` names a Redis run elsewhere (managed, replicated); nothing is rendered.
    deploy: bool = True
    address: str | None = None  # host:port when deploy is false
    image: str = "redis:7.4-alpine"
    cpu: str = "250m"
    memory: str = "512Mi"
    # The password: the cache Redis Secret's key (same Secret, one password to manage).

    @model_validator(mode="after")
    def _address(self) -> GcsRedisSettings:
        if self.enabled and not self.deploy and not self.address:
            raise ValueError("gcs_redis.address is required when gcs_redis.deploy is false")
        return self


class TlsFrontSettings(StrictModel):
    """The TLS front: an ingress-nginx Ingress terminating TLS and speaking gRPC to the proxies."""

    enabled: bool = True
    host: str = "eft.example.com"
    # kubernetes.io/tls Secret with the server certificate (created out of band, e.g. cert-manager).
    secret_name: str = "eft-grpc-tls"
    ingress_class: str = "nginx"
    # The controller's namespace: the only peer the gRPC NetworkPolicy admits when enabled.
    controller_namespace: str = "ingress-nginx"
    # "<namespace>/<secret>" holding ca.crt: clients must present a certificate it signed (mTLS).
    client_ca_secret: str | None = None
    max_body_size: str = "4m"


class MonitoringSettings(StrictModel):
    """Prometheus (operator) scraping Ray's metrics port on every Ray pod."""

    pod_monitor: bool = True
    # Where Prometheus runs: admitted to the metrics port by a NetworkPolicy.
    namespace: str = "monitoring"
    # Labels your Prometheus selects PodMonitors by (its podMonitorSelector).
    labels: dict[str, str] = Field(default_factory=dict)
    interval: str = "15s"


class NetworkSettings(StrictModel):
    # The KubeRay operator submits serveConfigV2 via the dashboard and probes the Serve proxy.
    kuberay_operator_namespace: str = "kuberay-system"
    # NetworkPolicyPeers allowed to reach the gRPC port when there is no TLS front; None = any source.
    # With `tls_front.enabled` only the ingress controller's namespace may (TLS ends there).
    grpc_clients: list[dict[str, Any]] | None = None
    # Extra NetworkPolicyPeers allowed to scrape Ray's metrics port (besides `monitoring.namespace`).
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
    # The coordinators' worker group (never the head): one replica per pod, at least two pods.
    coordinator: PodSettings
    pools: dict[str, PodSettings]
    model_volume: ModelVolume | None = None
    redis: RedisSettings = Field(default_factory=RedisSettings)
    network: NetworkSettings = Field(default_factory=NetworkSettings)
    gcs_redis: GcsRedisSettings = Field(default_factory=GcsRedisSettings)
    tls_front: TlsFrontSettings = Field(default_factory=TlsFrontSettings)
    monitoring: MonitoringSettings = Field(default_factory=MonitoringSettings)
    # preStop: how long a worker pod drains (Serve moves its replicas, open streams finish) before
    # Kubernetes stops it; terminationGracePeriodSeconds adds a margin on top.
    drain_s: int = Field(60, ge=0)
    grpc_service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    grpc_service_annotations: dict[str, str] = Field(default_factory=dict)
    # KubeRay autoscaler: how long a worker pod stays idle before it is removed.
    autoscaler_idle_timeout_s: int = Field(60, ge=0)
    extra_env: dict[str, str] = Field(default_factory=dict)
    # Secret (created out of band) with one key per env var the config names for secrets
    # (auth.keys_env: the API keys YAML; cache.hmac_key_env: the cache values' HMAC key); the
    # coordinator pods get each as an env var from it. Default: <release>-app-secrets.
    app_secret_name: str | None = None

    @model_validator(mode="after")
    def _names(self) -> StackSettings:
        for what, value in (("release", self.release), ("namespace", self.namespace)):
            if value is not None and not DNS_LABEL.match(value):
                raise ValueError(f"{what} {value!r} is not a DNS-1123 label")
        if self.tls_front.enabled and self.network.grpc_clients is not None:
            raise ValueError(
                "network.grpc_clients: with tls_front.enabled only the ingress controller reaches the gRPC port "
                "(TLS ends there); drop grpc_clients or disable tls_front"
            )
        if self.head.gpus:
            raise ValueError("head.gpus: the head hosts the GCS, Serve controller and a proxy; give GPUs to pools")
        return self

    def app_secret(self) -> str:
        return self.app_secret_name or f"{self.release}-app-secrets"

    def redis_secret(self) -> str:
        return self.redis.secret_name or f"{self.release}-redis"

    def redis_service(self) -> str:
        return f"{self.release}-redis"

    def gcs_redis_service(self) -> str:
        return f"{self.release}-gcs-redis"

    def gcs_redis_address(self) -> str:
        return self.gcs_redis.address or f"{self.gcs_redis_service()}:6379"


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
