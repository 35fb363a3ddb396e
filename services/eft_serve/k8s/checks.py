"""Refusing settings that contradict the config, before anything is rendered.

Owns: `check_settings` (pools match, every pool pinned to its own node group, GPUs where the
replicas need them, replicas fit a pod, models under the model volume, at least two coordinators
on their own group one per pod, the cache url points at the rendered Redis) and `uses_redis`.
Does NOT know: how manifests are built, nor schema validation of rendered output (`k8s.validate`).
"""

from __future__ import annotations

from urllib.parse import urlparse

from eft_serve.config import DEMO_SCHEME, EftConfig, PoolConfig
from eft_serve.k8s.constants import CACHE_PASSWORD_ENV, REDIS_PORT
from eft_serve.k8s.settings import PodSettings, StackSettings
from eft_serve.k8s.sizing import replicas_per_pod, with_derived_gpus


def uses_redis(cfg: EftConfig) -> bool:
    return cfg.cache.enabled and cfg.cache.resolved_backend() == "redis"


def check_settings(cfg: EftConfig, s: StackSettings) -> None:
    """Refuse settings that contradict the config; every message names the pool or key.
    Unset GPU counts are derived first (`with_derived_gpus`); an explicit count must suffice."""
    s = with_derived_gpus(cfg, s)
    problems: list[str] = []
    deployed = cfg.deployed_pools()  # a co-located LoRA role has no pods: its adapter rides in its base's
    if set(deployed) != set(s.pools):
        colocated = sorted(set(cfg.pools) - set(deployed))
        problems.append(
            f"settings pools {sorted(s.pools)} must match the config's pools {sorted(deployed)}"
            + (f" (co-located {colocated} run in their base's pods: no settings of their own)" if colocated else "")
        )
    coord_resource = cfg.coordinator.replica.node_group_resource
    seen: dict[str, str] = {}
    for role, pool in cfg.pools.items():
        if role not in deployed:
            problems += _check_model_volume(role, pool, s)  # its base's pods load the adapter
            continue
        pod = s.pools.get(role)
        res = pool.replica.node_group_resource
        if not res:
            problems.append(
                f"pools.{role}.replica.node_group_resource: required on Kubernetes "
                f"(e.g. 'pool_{role}') so replicas land only on the pool's worker group"
            )
        elif res in seen or res == coord_resource:
            problems.append(
                f"pools.{role}.replica.node_group_resource {res!r} is also used by {seen.get(res, 'the coordinator')}"
            )
        else:
            seen[res] = f"pool {role}"
        if pod is None:
            continue
        problems += _check_pool_pod(role, pool, pod, s)
    problems += _check_coordinator(cfg, s)
    problems += _check_cache(cfg, s)
    if problems:
        raise ValueError("settings do not fit the config:\n  " + "\n  ".join(problems))


def _check_coordinator(cfg: EftConfig, s: StackSettings) -> list[str]:
    """Coordinators off the head, on their own group, at least two, one per pod: no single point."""
    r = cfg.coordinator.replica
    problems: list[str] = []
    if not r.node_group_resource:
        problems.append(
            "coordinator.replica.node_group_resource: required on Kubernetes (e.g. 'eft_coordinator') so "
            "coordinators run on their own worker group, never on the head"
        )
    least = r.autoscaling.min_replicas if r.autoscaling else r.num_replicas
    if least < 2:
        problems.append(
            f"coordinator: at least 2 replicas (min_replicas or num_replicas), not {least}: one coordinator "
            "is a single point of failure for every stream"
        )
    per_pod = replicas_per_pod(r, s.coordinator)
    if per_pod != 1:
        problems.append(
            f"coordinator: {per_pod} replicas fit one coordinator pod ({s.coordinator.ray_num_cpus()} Ray CPUs, "
            f"{r.num_cpus} CPU per replica); size the pod (settings coordinator.cpu / ray_cpus) for exactly one, "
            "so that losing a pod loses one replica"
        )
    if r.num_gpus > 0:
        problems.append("coordinator.replica.num_gpus: the coordinator merges on CPU; give GPUs to pools")
    return problems


def _check_pool_pod(role: str, pool: PoolConfig, pod: PodSettings, s: StackSettings) -> list[str]:
    problems: list[str] = []
    r = pool.replica
    if r.num_gpus > 0 and pod.gpus == 0:
        problems.append(
            f"pools.{role}: replicas need {r.num_gpus} GPU but the pod has none (settings pools.{role}.gpus)"
        )
    if r.num_gpus == 0 and pod.gpus > 0:
        problems.append(f"pools.{role}: the pod requests {pod.gpus} GPU that no replica uses (replica.num_gpus is 0)")
    if pool.device.startswith("cuda") and r.num_gpus == 0:
        problems.append(f"pools.{role}.device {pool.device!r} needs replica.num_gpus > 0")
    if replicas_per_pod(r, pod) < 1:
        problems.append(
            f"pools.{role}: one replica ({r.num_cpus} CPU, {r.num_gpus} GPU) does not fit a pod "
            f"({pod.ray_num_cpus()} Ray CPUs, {pod.gpus} GPU, {pod.memory})"
        )
    return problems + _check_model_volume(role, pool, s)


def _check_model_volume(role: str, pool: PoolConfig, s: StackSettings) -> list[str]:
    problems: list[str] = []
    if not pool.model.startswith(DEMO_SCHEME):
        mount = s.model_volume.mount_path.rstrip("/") + "/" if s.model_volume else None
        if mount is None or not pool.model.startswith(mount):
            problems.append(
                f"pools.{role}.model {pool.model!r} is not under the model volume "
                f"({'none configured' if mount is None else mount})"
            )
    return problems


def _check_cache(cfg: EftConfig, s: StackSettings) -> list[str]:
    if not uses_redis(cfg):
        return []
    problems: list[str] = []
    c = cfg.cache
    if c.password is not None:
        problems.append("cache.password: keep the password out of the config; use cache.password_env")
    if s.redis.deploy:
        url = urlparse(c.url or "")
        if url.hostname != s.redis_service() or (url.port or REDIS_PORT) != REDIS_PORT:
            problems.append(
                f"cache.url {c.url!r} must point at the rendered Redis: redis://{s.redis_service()}:{REDIS_PORT}/0"
            )
        if c.password_env != CACHE_PASSWORD_ENV:
            problems.append(f"cache.password_env must be {CACHE_PASSWORD_ENV!r} (injected from the Secret)")
    return problems
