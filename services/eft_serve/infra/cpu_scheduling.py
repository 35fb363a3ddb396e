"""Put every thread of this process on a Linux scheduling policy: ``SCHED_IDLE`` or ``SCHED_BATCH``.

Owns one host-level hint for CPU serving. On a host whose pools share cores, a small pool's thread
that wakes for its step lands on any core, often the one running the large base's forward, the
longest step on an up-scaling stream's path, and takes a fair share of it. The small steps need
far less CPU than the large one and fit beside it on the other cores:

* ``idle`` (``SCHED_IDLE``): the thread runs only on CPU time no normal thread wants; on the large
  base's core it gets a tiny share (weight 3 against 1024), so the scheduler moves it to a free
  core instead. It cannot starve for good: a stream's large-base step waits for the small
  answers, so the large base then sleeps and leaves the core to them.
* ``batch`` (``SCHED_BATCH``): a waking thread does not preempt a running one, but keeps its fair
  share once the running one's slice ends.

`idle` is what the demo's small pools use because it keeps them off the large base's core more
firmly than `batch` (figures: docs/benchmarks.md). No effect where each pool has cores of its own
(Kubernetes node groups). Unlike ``cpu_affinity`` this pins nothing. Lowering a policy needs no
privilege; Linux only: elsewhere the hint is reported as not applied and changes nothing.
Does NOT know: Ray, configs, which pool this is.
"""

from __future__ import annotations

import os

from eft_serve.infra.cpu_affinity import thread_ids

__all__ = ["linux_policy", "use_scheduling_policy"]

# The names `replica.cpu_scheduling` takes.
_LINUX_NAMES: dict[str, str] = {"normal": "SCHED_OTHER", "batch": "SCHED_BATCH", "idle": "SCHED_IDLE"}


def linux_policy(policy: str) -> int | None:
    """The `os.SCHED_*` constant of `policy` (normal, batch, idle); None where this OS has none."""
    if policy not in _LINUX_NAMES:
        raise ValueError(f"unknown scheduling policy {policy!r}: use one of {', '.join(_LINUX_NAMES)}")
    value = getattr(os, _LINUX_NAMES[policy], None)
    return value if isinstance(value, int) and hasattr(os, "sched_setscheduler") else None


def use_scheduling_policy(policy: str, pid: int = 0) -> bool:
    """Move every thread of process `pid` (0: this one; so every thread they start) to `policy`;
    False when this OS has no such policy (nothing changed)."""
    value = linux_policy(policy)
    if value is None:
        return False
    for tid in thread_ids(pid):
        try:
            os.sched_setscheduler(tid, value, os.sched_param(0))
        except ProcessLookupError:
            continue  # the thread ended meanwhile
    return True
