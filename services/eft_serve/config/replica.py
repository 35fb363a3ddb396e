"""Serve replica options of one deployment (a pool or the coordinator) and their autoscaling.

Owns what Ray Serve is told about a deployment's replicas (count or autoscaling, concurrency caps,
Ray resources, CPU pinning and scheduling) and its translation into `Deployment.options(...)`. Knows nothing of
what the replicas run.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from eft_serve.strict_model import StrictModel


class AutoscalingConfig(StrictModel):
    """Serve autoscaling of one deployment: replicas follow the requests in flight."""

    min_replicas: int = Field(1, ge=0)
    """Fewest replicas Serve keeps (0 lets an idle deployment scale to zero)."""
    max_replicas: int = Field(1, ge=1)
    """Most replicas Serve may start."""
    initial_replicas: int | None = Field(None, ge=0)
    """Replicas at deploy time; null = min_replicas."""
    target_ongoing_requests: float = Field(2.0, gt=0)
    """Requests in flight per replica Serve aims for; below max_ongoing_requests, or it never scales."""
    upscale_delay_s: float = Field(5.0, ge=0)
    """How long demand must stay above target before Serve adds replicas."""
    downscale_delay_s: float = Field(30.0, ge=0)
    """How long demand must stay below target before Serve removes replicas."""
    metrics_interval_s: float = Field(1.0, gt=0)
    """How often replicas report their load to the autoscaler."""
    look_back_period_s: float = Field(5.0, gt=0)
    """Window over which the autoscaler averages the reported load."""

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class ReplicaConfig(StrictModel):
    """Ray Serve replica options for one deployment (a pool or the coordinator)."""

    num_replicas: int = Field(1, ge=1, description="fixed replica count when autoscaling is off")
    autoscaling: AutoscalingConfig | None = None
    """Serve autoscaling; null = a fixed `num_replicas`."""
    max_ongoing_requests: int = Field(16, ge=1)
    """Calls one replica takes at once; more wait in Serve's queue."""
    max_queued_requests: int = Field(128, ge=-1)
    """Beyond this many queued requests the caller gets RESOURCE_EXHAUSTED instead of waiting."""
    num_cpus: float = Field(1.0, ge=0)
    """CPUs Ray reserves per replica."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs Ray reserves per replica (a tensor-parallel vLLM pool: one per shard)."""
    memory_bytes: int | None = Field(None, ge=0)
    """Memory Ray reserves per replica; also the base of the automatic KV budget."""
    node_group_resource: str | None = None
    """Custom resource that only this pool's node group offers (placement on its own nodes)."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Further custom Ray resources per replica."""
    graceful_shutdown_timeout_s: float = Field(5.0, ge=0)
    """How long a stopping replica may finish its calls."""
    health_check_period_s: float = Field(5.0, gt=0)
    """How often Serve runs the replica's health check."""
    cpu_affinity: list[Annotated[int, Field(ge=0)]] | None = Field(None, min_length=1)
    """Linux CPU ids every thread of each replica runs on (None: wherever the OS schedules). For
    CPU hosts that run several deployments: give the large base cores of its own (infra.cpu_affinity)."""
    cpu_scheduling: Literal["normal", "batch", "idle"] = "normal"
    """Linux scheduling policy of the replica's threads, for pools that share cores with the large
    base (nothing pinned). `idle` (SCHED_IDLE): runs on CPU time no normal thread wants, so the
    large base's forward keeps its core; the demo's small pools use it. `batch` (SCHED_BATCH): a
    waking thread never preempts a running one, same CPU share (infra.cpu_scheduling). Ignored off Linux."""
    serve_access_log: bool | None = None
    """Ray Serve's own access-log line per call to this deployment. null = off for a pool (it is
    called once per token per stream, and every line costs CPU to write and ship; docs/benchmarks.md)
    and Serve's default (on) for the coordinator, one line per request."""

    @field_validator("cpu_affinity")
    @classmethod
    def _distinct_cpus(cls, cpus: list[int] | None) -> list[int] | None:
        if cpus is not None and len(set(cpus)) != len(cpus):
            raise ValueError(f"cpu_affinity {cpus} names a CPU twice")
        return cpus

    @model_validator(mode="after")
    def _scaling_is_possible(self) -> ReplicaConfig:
        # Serve never scales a deployment whose target is not below the per-replica cap.
        if self.autoscaling and self.autoscaling.target_ongoing_requests >= self.max_ongoing_requests:
            raise ValueError(
                f"autoscaling.target_ongoing_requests ({self.autoscaling.target_ongoing_requests}) must be "
                f"below max_ongoing_requests ({self.max_ongoing_requests}) or the deployment never scales"
            )
        return self

    def ray_actor_options(self) -> dict[str, Any]:
        resources = dict(self.resources)
        if self.node_group_resource:
            # A tiny amount: it pins placement without limiting replicas per node.
            resources.setdefault(self.node_group_resource, 0.001)
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if resources:
            options["resources"] = resources
        if self.memory_bytes:
            options["memory"] = self.memory_bytes
        return options

    def deployment_options(self, access_log_default: bool | None = None) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options(...)`; `access_log_default`: the deployment
        kind's default for `serve_access_log` (None = Serve's own)."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": self.ray_actor_options(),
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "health_check_period_s": self.health_check_period_s,
        }
        if self.autoscaling:
            a = self.autoscaling
            options["autoscaling_config"] = {
                "min_replicas": a.min_replicas,
                "max_replicas": a.max_replicas,
                "initial_replicas": a.initial_replicas,
                "target_ongoing_requests": a.target_ongoing_requests,
                "upscale_delay_s": a.upscale_delay_s,
                "downscale_delay_s": a.downscale_delay_s,
                "metrics_interval_s": a.metrics_interval_s,
                "look_back_period_s": a.look_back_period_s,
            }
        else:
            options["num_replicas"] = self.num_replicas
        access_log = access_log_default if self.serve_access_log is None else self.serve_access_log
        if access_log is not None:
            options["logging_config"] = {"enable_access_log": access_log}
        return options


def replica_with_defaults(value: Any, defaults: dict[str, Any]) -> Any:
    """A `replica:` mapping with `defaults` under the keys it leaves out (a `before` validator's
    body for a deployment kind whose replica defaults differ from ReplicaConfig's own), so giving
    one key never silently resets another (e.g. max_ongoing_requests to ReplicaConfig's 16)."""
    return {**defaults, **value} if isinstance(value, dict) else value
