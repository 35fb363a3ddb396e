"""Serve options of a tensor-parallel pool: one placement group per replica, one GPU bundle per shard.

Owns turning `engine: vllm` with `vllm.tensor_parallel_size = N > 1` into Serve deployment options:
the replica actor sits in bundle 0 (its CPUs, memory and node-group resource, no GPU) and N
bundles of one GPU each follow, packed onto one node (`STRICT_PACK`: the shards talk over the
node's GPU links, and one pod of the pool's node group holds the whole replica). vLLM, started
inside the replica, finds the replica's placement group and runs its N shard workers in those
bundles (its Ray executor). Pure: builds dicts, imports no Ray. Does NOT know how vLLM shards.
"""

from __future__ import annotations

from typing import Any

from eft_serve.config import PoolConfig

STRATEGY = "STRICT_PACK"


def tensor_parallel_size(pool: PoolConfig) -> int:
    return pool.vllm.tensor_parallel_size if pool.engine == "vllm" else 1


def apply_tensor_parallel(pool: PoolConfig, options: dict[str, Any]) -> dict[str, Any]:
    """`options` (from `ReplicaConfig.deployment_options`) with per-replica placement groups when
    the pool is tensor parallel; unchanged otherwise."""
    tp = tensor_parallel_size(pool)
    if tp <= 1:
        return options
    actor = dict(options["ray_actor_options"])
    head: dict[str, float] = {"CPU": float(actor.get("num_cpus", 0))}
    head.update({k: float(v) for k, v in (actor.get("resources") or {}).items()})
    if actor.get("memory"):
        head["memory"] = float(actor["memory"])
    # The GPUs belong to the shard bundles, not to the replica actor (bundle 0 has none).
    actor["num_gpus"] = 0
    out = dict(options)
    out["ray_actor_options"] = actor
    out["placement_group_bundles"] = [head] + [{"GPU": 1.0} for _ in range(tp)]
    out["placement_group_strategy"] = STRATEGY
    return out
