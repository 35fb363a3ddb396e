"""The Namespace object of a release or overlay.

Owns: `namespace_manifest` (with the Pod Security Standard Ray needs).
Does NOT know: settings, the config or any other object.
"""

from __future__ import annotations

from typing import Any


def namespace_manifest(name: str) -> dict[str, Any]:
    # Ray needs nothing beyond the baseline Pod Security Standard.
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": {"pod-security.kubernetes.io/enforce": "baseline"}},
    }
