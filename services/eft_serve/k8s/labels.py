"""Names, labels and object metadata every manifest of a release shares.

Owns: worker-group names from pool roles, the selector labels of each part of a release, and
the `metadata` block (name, namespace, labels) of the objects we render.
Does NOT know: what any one manifest contains (`manifests.*`), nor the `EftConfig`.
"""

from __future__ import annotations

from typing import Any

from eft_serve.k8s.constants import COORDINATOR_GROUP, PART_OF
from eft_serve.k8s.settings import DNS_LABEL, StackSettings


def group_name(role: str) -> str:
    """Worker group of a pool: names end up in pod names, which allow no underscores."""
    name = "pool-" + role.replace("_", "-").lower()
    if not DNS_LABEL.match(name):
        raise ValueError(f"pool role {role!r} gives worker group {name!r}, not a DNS-1123 label")
    return name


def selector_labels(s: StackSettings, component: str, pool: str | None = None) -> dict[str, str]:
    """Labels that select one part of this release.

    Deliberately not `app.kubernetes.io/name`/`created-by`: on Ray pods KubeRay sets those and
    its head Service selects on them; overriding them would cut the workers off the GCS.
    """
    labels = {
        "app.kubernetes.io/part-of": PART_OF,
        "app.kubernetes.io/instance": s.release,
        "app.kubernetes.io/component": component,
    }
    if pool is not None:
        labels["eft-serve.io/pool"] = pool
    return labels


def coordinator_labels(s: StackSettings) -> dict[str, str]:
    """Pods of the coordinators' worker group."""
    return {**selector_labels(s, "ray-worker"), "eft-serve.io/group": COORDINATOR_GROUP}


def ray_pod_selector(s: StackSettings) -> dict[str, Any]:
    """Every Ray pod (head and workers) of this release."""
    return {
        "matchLabels": {"app.kubernetes.io/part-of": PART_OF, "app.kubernetes.io/instance": s.release},
        "matchExpressions": [
            {"key": "app.kubernetes.io/component", "operator": "In", "values": ["ray-head", "ray-worker"]}
        ],
    }


def object_meta(s: StackSettings, name: str, component: str, **extra: Any) -> dict[str, Any]:
    """`metadata` of an object of this release (namespace only when the settings name one)."""
    meta: dict[str, Any] = {"name": name}
    if s.namespace:
        meta["namespace"] = s.namespace
    meta["labels"] = {**selector_labels(s, component), "app.kubernetes.io/managed-by": "eft-serve-render"}
    meta.update(extra)
    return meta
