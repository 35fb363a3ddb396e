"""Scheduling policies of a replica's threads (idle, batch): every thread it has, threads it
starts later, another process's threads (the bench's A/B), and the demo's default (small pools
idle, the large base normal).

Runs in child interpreters so this test process keeps its own policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from eft_serve.config import ReplicaConfig, demo_config
from eft_serve.infra.cpu_scheduling import linux_policy, use_scheduling_policy

CHILD = textwrap.dedent(
    """
    import json, os, sys, threading
    from eft_serve.infra.cpu_scheduling import use_scheduling_policy

    stop = threading.Event()
    early = threading.Thread(target=stop.wait)  # a thread that exists before the switch
    early.start()
    before = {tid: os.sched_getscheduler(int(tid)) for tid in os.listdir("/proc/self/task")}
    applied = use_scheduling_policy(sys.argv[1])
    late = threading.Thread(target=stop.wait)  # started after: inherits its creator's policy
    late.start()
    after = {tid: os.sched_getscheduler(int(tid)) for tid in os.listdir("/proc/self/task")}
    stop.set()
    print(json.dumps({"applied": applied, "before": before, "after": after, "late": late.native_id}))
    """
)
LINUX = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="scheduling policies are Linux-only")


@LINUX
@pytest.mark.parametrize("policy", ["idle", "batch"])
def test_every_thread_moves_to_the_policy_including_later_ones(policy: str) -> None:
    run = subprocess.run([sys.executable, "-c", CHILD, policy], capture_output=True, text=True, timeout=60, check=True)
    out = json.loads(run.stdout)
    assert out["applied"] is True
    assert set(out["before"].values()) == {os.SCHED_OTHER}
    assert len(out["after"]) >= 3 and str(out["late"]) in out["after"]
    assert set(out["after"].values()) == {linux_policy(policy)} != {os.SCHED_OTHER}


@LINUX
def test_another_process_threads_can_be_moved_by_pid() -> None:
    script = "import threading, time; [threading.Thread(target=time.sleep, args=(30,)).start() for _ in range(2)]; time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", script])
    try:
        tasks = f"/proc/{child.pid}/task"
        for _ in range(100):  # until the child has started its threads
            if len(os.listdir(tasks)) >= 3:
                break
            time.sleep(0.05)
        assert use_scheduling_policy("idle", child.pid)
        policies = {os.sched_getscheduler(int(t)) for t in os.listdir(tasks)}
        assert len(os.listdir(tasks)) >= 3 and policies == {os.SCHED_IDLE}
        assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the caller's own policy is untouched
    finally:
        child.kill()
        child.wait()


def test_the_demo_idle_schedules_only_the_small_pools() -> None:
    cfg = demo_config(full_family=True)
    policies = {role: pool.replica.cpu_scheduling for role, pool in cfg.pools.items()}
    assert policies["large_base"] == policies["large_ft"] == "normal"
    assert {policies[r] for r in ("small_base", "small_ft", "small_ft_b")} == {"idle"}
    assert cfg.coordinator.replica.cpu_scheduling == "normal"
    assert ReplicaConfig().cpu_scheduling == "normal"
