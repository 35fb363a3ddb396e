"""PodDisruptionBudgets of a release: never the head, one pool pod at a time.

Owns: `disruption_budgets`. Does NOT know: the pods' specs, nor the autoscaler (which deletes
pods directly and is never blocked by these budgets).
"""

from __future__ import annotations

from typing import Any

from eft_serve.config import EftConfig
from eft_serve.k8s.labels import group_name, object_meta, selector_labels
from eft_serve.k8s.settings import StackSettings


def disruption_budgets(cfg: EftConfig, s: StackSettings) -> list[dict[str, Any]]:
    """Voluntary evictions (node drains, upgrades) take one pool pod at a time and never the head:
    without GCS fault tolerance, losing the head restarts the whole cluster. The KubeRay
    autoscaler deletes pods directly, so these budgets never block scaling down."""

    def pdb(name: str, labels: dict[str, str], max_unavailable: int) -> dict[str, Any]:
        return {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": object_meta(s, f"{s.release}-{name}", "pdb"),
            "spec": {
                "maxUnavailable": max_unavailable,
                "selector": {"matchLabels": labels},
                # A crash-looping pod must not block a drain.
                "unhealthyPodEvictionPolicy": "AlwaysAllow",
            },
        }

    out = [pdb("head", selector_labels(s, "ray-head"), 0)]
    out += [pdb(group_name(role), selector_labels(s, "ray-worker", role), 1) for role in cfg.pools]
    return out
