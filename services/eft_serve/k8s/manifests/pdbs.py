"""PodDisruptionBudgets of a release: none for the head, one per worker group that can spare a pod.

Owns: `disruption_budgets`. A budget `maxUnavailable: 1` exists only for a group that always
has at least two pods (its minReplicas): a drain then takes one pod at a time and the others keep
serving. A group that may run a single pod gets no budget: `maxUnavailable: 0` (or `minAvailable:
1`) on it would block every node drain and cluster upgrade forever, and `maxUnavailable: 1` would
promise nothing; such a pool is a single point by configuration (raise its min replicas to 2).
The head gets none either: with GCS fault tolerance and proxies on every node, losing it costs
neither streams nor the cluster, so it must not block drains.
Does NOT know: the pods' specs, nor the autoscaler (which deletes pods directly and is never
blocked by these budgets).
"""

from __future__ import annotations

from typing import Any

from eft_serve.config import EftConfig, ReplicaConfig
from eft_serve.k8s.constants import COORDINATOR_GROUP
from eft_serve.k8s.labels import coordinator_labels, group_name, object_meta, selector_labels
from eft_serve.k8s.settings import PodSettings, StackSettings
from eft_serve.k8s.sizing import pod_counts


def spares_a_pod(replica: ReplicaConfig, pod: PodSettings) -> bool:
    """Whether a worker group always runs at least two pods (so one may be evicted)."""
    low, _, _ = pod_counts(replica, pod)
    return low >= 2


def disruption_budgets(cfg: EftConfig, s: StackSettings) -> list[dict[str, Any]]:
    def pdb(name: str, labels: dict[str, str]) -> dict[str, Any]:
        return {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": object_meta(s, f"{s.release}-{name}", "pdb"),
            "spec": {
                "maxUnavailable": 1,
                "selector": {"matchLabels": labels},
                # A crash-looping pod must not block a drain.
                "unhealthyPodEvictionPolicy": "AlwaysAllow",
            },
        }

    out = []
    if spares_a_pod(cfg.coordinator.replica, s.coordinator):
        out.append(pdb(COORDINATOR_GROUP, coordinator_labels(s)))
    for role, pool in cfg.deployed_pools().items():  # co-located LoRA roles have no pods of their own
        if spares_a_pod(pool.replica, s.pools[role]):
            out.append(pdb(group_name(role), selector_labels(s, "ray-worker", role)))
    return out
