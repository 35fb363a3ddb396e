"""Give this process's threads Linux's batch scheduling policy (``SCHED_BATCH``).

Owns one host-level hint for CPU serving. On a host whose pools share cores, a small pool's thread
that wakes up for its step preempts whatever runs on the core it lands on, often the large base's
forward, the longest step on an up-scaling stream's path. Under ``SCHED_BATCH`` a waking thread
does not preempt a running one: it takes the next free slice, with the same share of CPU as before
(nice level unchanged). Measured on the 2-core development box, same stack, rounds interleaved:
EFT ÷ large base by ITL p50 1.23 → 1.17 with the small pools batch-scheduled
(docs/benchmarks.md). No effect where each pool has cores of its own (Kubernetes node groups).
Unlike ``cpu_affinity`` this pins nothing: the OS still places every thread on any core.
Linux only: elsewhere the hint is reported as not applied and changes nothing.
Does NOT know: Ray, configs, which pool this is.
"""

from __future__ import annotations

import os

from eft_serve.infra.cpu_affinity import thread_ids

__all__ = ["use_batch_scheduling"]


def use_batch_scheduling() -> bool:
    """Move every thread of this process (and so every thread they start) to ``SCHED_BATCH``;
    False when this OS has no such policy (nothing changed)."""
    setscheduler = getattr(os, "sched_setscheduler", None)
    policy = getattr(os, "SCHED_BATCH", None)
    if setscheduler is None or policy is None:
        return False
    for tid in thread_ids():
        try:
            setscheduler(tid, policy, os.sched_param(0))
        except ProcessLookupError:
            continue  # the thread ended meanwhile
    return True
