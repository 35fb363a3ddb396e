"""How replicas pack onto pods: replicas per pod and a worker group's pod counts.

Owns: `with_derived_gpus` (pods whose settings name no GPU count get what one replica reserves:
the tensor-parallel size for a TP pool), `replicas_per_pod` (by Ray's accounting of CPUs, GPUs and
memory) and `pod_counts` (min / initial / max pods of a worker group hosting one deployment).
Does NOT know: whether the settings fit the config (`checks`), nor any manifest layout.
"""

from __future__ import annotations

import math

from eft_serve.config import EftConfig, ReplicaConfig
from eft_serve.k8s.constants import NODE_GROUP_RESOURCE_AMOUNT
from eft_serve.k8s.quantities import parse_bytes
from eft_serve.k8s.settings import PodSettings, StackSettings


def with_derived_gpus(cfg: EftConfig, s: StackSettings) -> StackSettings:
    """`s` with every unset `gpus` filled: a pool pod holds one replica's GPUs (so a vLLM pool
    with tensor_parallel_size N gets N GPUs), the head and coordinator pods none."""
    pools = {
        role: pod
        if pod.gpus is not None
        else pod.model_copy(update={"gpus": math.ceil(cfg.pools[role].replica.num_gpus) if role in cfg.pools else 0})
        for role, pod in s.pools.items()
    }
    head = s.head if s.head.gpus is not None else s.head.model_copy(update={"gpus": 0})
    coordinator = s.coordinator if s.coordinator.gpus is not None else s.coordinator.model_copy(update={"gpus": 0})
    return s.model_copy(update={"pools": pools, "head": head, "coordinator": coordinator})


def replicas_per_pod(replica: ReplicaConfig, pod: PodSettings) -> int:
    """How many replicas of a deployment fit on one pod of its worker group (by Ray's accounting)."""
    fits: list[int] = []
    if replica.num_cpus > 0:
        fits.append(int(pod.ray_num_cpus() // replica.num_cpus))
    if replica.num_gpus > 0:
        fits.append(int((pod.gpus or 0) // replica.num_gpus))
    if replica.memory_bytes:
        fits.append(int(parse_bytes(pod.memory) // replica.memory_bytes))
    return min(fits) if fits else NODE_GROUP_RESOURCE_AMOUNT


def pod_counts(replica: ReplicaConfig, pod: PodSettings) -> tuple[int, int, int]:
    """(minReplicas, replicas, maxReplicas) of a worker group hosting one deployment."""
    per_pod = replicas_per_pod(replica, pod)
    a = replica.autoscaling
    if a is None:
        n = math.ceil(replica.num_replicas / per_pod)
        return n, n, n
    initial = a.initial_replicas if a.initial_replicas is not None else a.min_replicas
    return (math.ceil(a.min_replicas / per_pod), math.ceil(initial / per_pod), math.ceil(a.max_replicas / per_pod))
