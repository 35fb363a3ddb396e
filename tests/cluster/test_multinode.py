"""Placement on node groups, independent autoscaling and node failure on the session's multi-node cluster."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from eft_serve.client import EftClient
from eft_serve.serve.names import COORDINATOR_APP, POOL_DEPLOYMENT, pool_app_name
from eft_serve.testing.loadgen import LoadGenerator, ReplicaTimeline
from eft_serve.testing.multinode_cluster import replica_ips, running_replicas

pytestmark = pytest.mark.cluster
ROLES = ["large_base", "small_base", "small_ft"]


def wait_until(predicate, timeout_s: float, interval_s: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def probe(address: str) -> bool:
    """One uncacheable request (a prompt never seen before) succeeds end to end."""
    try:
        with EftClient(address, timeout=30) as client:
            list(client.generate(f"Q: {time.time_ns()}", temperature=0, max_new_tokens=2))
        return True
    except grpc.RpcError:
        return False


def test_each_pool_runs_on_its_own_node_group(cluster_stack) -> None:
    cluster = cluster_stack["cluster"]
    for role in ROLES:
        ips = replica_ips(pool_app_name(role))
        assert ips and set(ips) == {cluster.node_ips[role]}, (role, ips)
    assert set(replica_ips(COORDINATOR_APP)) == {cluster.head_ip}
    with EftClient(cluster_stack["address"], timeout=120) as client:
        msgs = list(client.generate("Q: ", temperature=0, max_new_tokens=8, ignore_eos=True))
    assert msgs[-1].usage.completion_tokens == 8


def test_large_base_scales_up_under_load_while_small_pools_stay_small(cluster_stack) -> None:
    prompt = cluster_stack["family"].world.held_out_questions()[0].prompt
    timeline = ReplicaTimeline(ROLES).start()
    load = LoadGenerator(cluster_stack["address"], streams=6, prompt=prompt, max_new_tokens=64, max_seconds=150).start()
    try:
        scaled = wait_until(lambda: timeline.latest().get("large_base", 0) >= 2, timeout_s=120)
    finally:
        result = load.stop()
    print("\n" + timeline.render())
    assert scaled, f"large_base never scaled past 1 replica; load: {result}"
    assert result.completed > 0 and not result.errors, result
    assert timeline.max_of("small_base") == 1 and timeline.max_of("small_ft") == 1
    # And back down once the load is gone.
    down = wait_until(lambda: timeline.latest().get("large_base", 0) == 1, timeout_s=120)
    timeline.stop()
    print(timeline.render())
    assert down, "large_base did not scale back down after the load"
    for ip in replica_ips(pool_app_name("large_base")):
        assert ip == cluster_stack["cluster"].node_ips["large_base"]


def test_node_failure_under_load_never_hangs_or_corrupts(cluster_stack) -> None:
    cluster = cluster_stack["cluster"]
    address = cluster_stack["address"]
    prompt = cluster_stack["family"].world.held_out_questions()[1].prompt
    seeds = list(range(500, 504))
    outcomes: dict[int, object] = {}

    def stream(seed: int) -> None:
        try:
            with EftClient(address, timeout=90) as client:
                msgs = list(client.generate(prompt, temperature=1.0, seed=seed, max_new_tokens=96, ignore_eos=True))
            outcomes[seed] = [t.token_id for m in msgs for t in m.tokens]
        except grpc.RpcError as e:
            outcomes[seed] = e.code()

    threads = [threading.Thread(target=stream, args=(s,)) for s in seeds]
    started = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(1.0)
    cluster.kill_node("large_base")
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a request hung after the node died"
    assert time.monotonic() - started < 120
    for seed, outcome in outcomes.items():
        assert isinstance(outcome, list) or outcome == grpc.StatusCode.UNAVAILABLE, (seed, outcome)
    cluster.restore_node("large_base")
    assert wait_until(lambda: running_replicas(pool_app_name("large_base"), POOL_DEPLOYMENT) >= 1, timeout_s=180)
    assert wait_until(lambda: probe(address), timeout_s=180, interval_s=2), "service did not recover"
    with EftClient(address, timeout=120) as client:
        for seed, outcome in outcomes.items():
            again = [
                t.token_id
                for m in client.generate(prompt, temperature=1.0, seed=seed, max_new_tokens=96, ignore_eos=True)
                for t in m.tokens
            ]
            if isinstance(outcome, list):
                assert outcome == again, f"seed {seed}: text completed during the failure differs"
    assert set(replica_ips(pool_app_name("large_base"))) == {cluster.node_ips["large_base"]}
