"""How replicas pack onto pods: replicas per pod and a worker group's pod counts.

Owns: `replicas_per_pod` (by Ray's accounting of CPUs, GPUs and memory) and `pod_counts`
(min / initial / max pods of a worker group hosting one deployment).
Does NOT know: whether the settings fit the config (`checks`), nor any manifest layout.
"""

from __future__ import annotations

import math

from eft_serve.config import ReplicaConfig
from eft_serve.k8s.constants import NODE_GROUP_RESOURCE_AMOUNT
from eft_serve.k8s.quantities import parse_bytes
from eft_serve.k8s.settings import PodSettings


def replicas_per_pod(replica: ReplicaConfig, pod: PodSettings) -> int:
    """How many replicas of a deployment fit on one pod of its worker group (by Ray's accounting)."""
    fits: list[int] = []
    if replica.num_cpus > 0:
        fits.append(int(pod.ray_num_cpus() // replica.num_cpus))
    if replica.num_gpus > 0:
        fits.append(int(pod.gpus // replica.num_gpus))
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
