"""Pin this process (every thread it has now, and so every thread they start) to a set of CPUs.

Owns one host-level knob for CPU serving: several pools sharing a host otherwise time-slice each
other's cores, and the large base's forward — the longest step on an up-scaling stream's path —
waits for a core while the small pools and the coordinator run: the same CPU time, but longer
wall time (docs/benchmarks.md#why-the-engines-work-this-way).
Giving the large pool its own cores, as vLLM's CPU backend binds its threads to cores, keeps
other processes off them. Linux only (``sched_setaffinity``); elsewhere a requested pin is an error
rather than silently ignored.
Does NOT know: Ray, configs, which pool this is. Callers pass CPU ids.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

__all__ = ["pin_process_to_cpus", "thread_ids", "usable_cpus"]

_CPUSET_FILES = ("/sys/fs/cgroup/cpuset.cpus.effective", "/sys/fs/cgroup/cpuset/cpuset.effective_cpus")


def _parse_cpu_list(text: str) -> set[int]:
    """``0-3,6`` -> {0, 1, 2, 3, 6} (the kernel's CPU list format)."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def thread_ids(pid: int = 0) -> list[int]:
    """Every thread of process `pid` (0: this one) now (``[pid]`` where /proc is missing). The CPU
    mask and the scheduling policy are per thread, and a thread started later inherits both from
    its creator: setting them on each of these covers the whole process."""
    tasks = Path(f"/proc/{pid or 'self'}/task")
    return sorted(int(t.name) for t in tasks.iterdir()) if tasks.is_dir() else [pid]


def usable_cpus() -> set[int]:
    """The CPUs this host lets the process use: its cgroup's cpuset when one is readable, else
    every CPU the OS reports. Not the current affinity mask: a process may widen that (a replica
    inherits its parent's mask, and its own config may name other CPUs of the host)."""
    for path in _CPUSET_FILES:
        try:
            cpus = _parse_cpu_list(Path(path).read_text())
        except (OSError, ValueError):
            continue
        if cpus:
            return cpus
    return set(range(os.cpu_count() or 1))


def pin_process_to_cpus(cpus: Collection[int]) -> set[int]:
    """Restrict every thread of this process to ``cpus``; returns the set applied.

    Raises ``ValueError`` naming the usable CPUs when ``cpus`` is empty or not a subset of them
    (a container's cpuset, a node with fewer cores than configured).
    """
    wanted = {int(c) for c in cpus}
    setaffinity = getattr(os, "sched_setaffinity", None)
    if setaffinity is None:
        raise ValueError("cpu_affinity needs Linux (os.sched_setaffinity); leave it unset on this host")
    usable = usable_cpus()
    if not wanted or not wanted <= usable:
        raise ValueError(
            f"cpu_affinity {sorted(wanted)} is not a non-empty subset of this host's usable CPUs "
            f"{sorted(usable)}; pick CPU ids from that set or leave cpu_affinity unset"
        )
    # sched_setaffinity(0) pins only the calling thread: pin each existing thread.
    for tid in thread_ids():
        try:
            setaffinity(tid, wanted)
        except ProcessLookupError:
            continue  # the thread ended meanwhile
        except OSError as e:
            raise ValueError(f"cpu_affinity {sorted(wanted)} could not be applied on this host: {e}") from None
    return wanted
