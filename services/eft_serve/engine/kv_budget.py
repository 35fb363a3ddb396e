"""How many bytes of KV a replica may keep when the config does not say (``kv_cache_bytes: null``).

The rule (docs/configuration.md, `pools.<role>.kv_cache_bytes`), applied once when the engine loads, after its weights are
in memory:

* ``replica.memory_bytes`` set (the replica's Ray memory reservation, a pod's share): half of
  what is left after the weights — ``(memory_bytes − weight bytes) / 2``; the other half is for
  activations of batched forwards, the Python/torch/Ray runtime and fragmentation.
* else on CUDA: half of the device's free memory (weights already loaded), leaving room for
  activations and for other replicas sharing the device.
* else on CPU: a fifth of the memory available to this process now (``MemAvailable``, capped
  by the cgroup limit when there is one), so several pools on one host do not claim it all.

The budget is a cap, not a reservation: buffers are allocated as sequences arrive. Knows
nothing of Ray or configs: callers pass the numbers.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["auto_kv_cache_bytes", "available_memory_bytes"]

MEMORY_SHARE = 0.5
CUDA_FREE_SHARE = 0.5
CPU_AVAILABLE_SHARE = 0.2


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory_bytes() -> int:
    """Memory this process could still use: ``MemAvailable``, capped by a cgroup v2/v1 limit."""
    avail: int | None = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if avail is None:  # not Linux: assume a modest 4 GiB rather than guess high
        avail = 4 << 30
    for limit_path, usage_path in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        if limit is not None and usage is not None and limit < (1 << 60):
            avail = min(avail, max(0, limit - usage))
            break
    return avail


def auto_kv_cache_bytes(device: torch.device, weight_bytes: int, memory_bytes: int | None = None) -> int:
    """The KV budget by the rule above."""
    if memory_bytes:
        return max(0, int((memory_bytes - weight_bytes) * MEMORY_SHARE))
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * CUDA_FREE_SHARE)
    return int(available_memory_bytes() * CPU_AVAILABLE_SHARE)
