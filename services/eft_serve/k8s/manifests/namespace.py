"""The Namespace object of a release or overlay.

Owns: `namespace_manifest`, labelled with the Pod Security Standard `restricted` (enforce, audit,
warn): every pod we render runs as non-root, with the RuntimeDefault seccomp profile, all
capabilities dropped and no privilege escalation (see `rayservice.container_security_context`).
Does NOT know: settings, the config or any other object.
"""

from __future__ import annotations

from typing import Any

POD_SECURITY_LEVEL = "restricted"


def namespace_manifest(name: str) -> dict[str, Any]:
    labels = {f"pod-security.kubernetes.io/{mode}": POD_SECURITY_LEVEL for mode in ("enforce", "audit", "warn")}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}
