"""Pinning a process to CPUs: every thread it has, threads it starts later, clear refusals.

Runs in a child interpreter so this test process keeps its own CPUs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from eft_serve.infra.cpu_affinity import usable_cpus

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux-only")

CHILD = textwrap.dedent(
    """
    import json, os, sys, threading
    from eft_serve.infra.cpu_affinity import pin_process_to_cpus

    stop = threading.Event()
    early = threading.Thread(target=stop.wait)  # a thread that exists before the pin
    early.start()
    wanted = {int(c) for c in sys.argv[1].split(",")}
    try:
        applied = pin_process_to_cpus(wanted)
    except ValueError as e:
        print(json.dumps({"error": str(e)}))
        stop.set()
        sys.exit(0)
    late = threading.Thread(target=stop.wait)  # started after: inherits its creator's CPUs
    late.start()
    masks = {tid: sorted(os.sched_getaffinity(int(tid))) for tid in os.listdir("/proc/self/task")}
    stop.set()
    print(json.dumps({"applied": sorted(applied), "masks": masks}))
    """
)


def _run(cpus: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, cpus], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_thread_is_pinned_including_later_ones() -> None:
    cpu = max(os.sched_getaffinity(0))
    got = _run(str(cpu))
    assert got["applied"] == [cpu]
    assert len(got["masks"]) >= 3  # main, the early thread, the late thread
    assert all(mask == [cpu] for mask in got["masks"].values()), got["masks"]


def test_cpus_outside_the_allowed_set_are_refused_with_the_allowed_set() -> None:
    usable = sorted(usable_cpus())
    got = _run(f"{usable[0]},{max(usable) + 1000}")
    assert "not a non-empty subset" in got["error"]
    assert str(usable) in got["error"]


def test_a_narrower_inherited_mask_can_be_widened_within_the_host() -> None:
    # A replica inherits its parent's mask (e.g. a launcher pinned to one CPU) but may be
    # configured onto other usable CPUs.
    usable = sorted(usable_cpus())
    if len(usable) < 2:
        pytest.skip("needs 2 usable CPUs")
    code = f"import os; os.sched_setaffinity(0, {{{usable[1]}}}); exec({CHILD!r})"
    out = subprocess.run([sys.executable, "-c", code, str(usable[0])], capture_output=True, text=True, timeout=60)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["applied"] == [usable[0]]
    assert all(mask == [usable[0]] for mask in got["masks"].values())
