"""The processes of one pool's Serve replicas on this host, found by the title Ray gives them.

Owns that lookup for tests and benchmarks that read or set something per replica process (CPU
masks, scheduling policy, RSS). Knows nothing of what they do with it.
"""

from __future__ import annotations

from typing import Any

from eft_serve.serve.names import pool_app_name


def replica_processes(role: str) -> list[Any]:
    """`psutil.Process` of every replica of pool `role` running here ("ServeReplica:pool-<role>")."""
    import psutil  # installed with Ray; only tests and benchmarks need it

    title = f"ServeReplica:{pool_app_name(role)}"
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if title in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found
