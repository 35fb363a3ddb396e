"""Batch scheduling of a replica's threads: every thread it has, threads it starts later, and the
demo's default (small pools batch, the large base normal).

Runs in a child interpreter so this test process keeps its own policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from eft_serve.config import ReplicaConfig, demo_config

CHILD = textwrap.dedent(
    """
    import json, os, threading
    from eft_serve.infra.cpu_scheduling import use_batch_scheduling

    stop = threading.Event()
    early = threading.Thread(target=stop.wait)  # a thread that exists before the switch
    early.start()
    before = {tid: os.sched_getscheduler(int(tid)) for tid in os.listdir("/proc/self/task")}
    applied = use_batch_scheduling()
    late = threading.Thread(target=stop.wait)  # started after: inherits its creator's policy
    late.start()
    after = {tid: os.sched_getscheduler(int(tid)) for tid in os.listdir("/proc/self/task")}
    stop.set()
    print(json.dumps({"applied": applied, "before": before, "after": after, "late": late.native_id}))
    """
)


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux-only")
def test_every_thread_moves_to_sched_batch_including_later_ones() -> None:
    run = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=True)
    out = json.loads(run.stdout)
    assert out["applied"] is True
    assert set(out["before"].values()) == {os.SCHED_OTHER}
    assert len(out["after"]) >= 3 and str(out["late"]) in out["after"]
    assert set(out["after"].values()) == {os.SCHED_BATCH}


def test_the_demo_batch_schedules_only_the_small_pools() -> None:
    cfg = demo_config(full_family=True)
    policies = {role: pool.replica.cpu_scheduling for role, pool in cfg.pools.items()}
    assert policies["large_base"] == policies["large_ft"] == "normal"
    assert {policies[r] for r in ("small_base", "small_ft", "small_ft_b")} == {"batch"}
    assert cfg.coordinator.replica.cpu_scheduling == "normal"
    assert ReplicaConfig().cpu_scheduling == "normal"
