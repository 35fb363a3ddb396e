"""KV-affinity routing of pool calls: the pure ranking, and the router over fake replicas (no Ray cluster)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from eft_serve.config import PoolConfig
from eft_serve.serve.app import KV_AFFINITY_ROUTER, pool_deployment_options
from eft_serve.serve.kv_affinity_router import KvAffinityRouter, ReplicaLoad, rank_replicas, rendezvous_order

SEQUENCES = [f"req-{i:05d}" for i in range(4000)]


def idle(*ids: str, capacity: int = 16) -> list[ReplicaLoad]:
    return [ReplicaLoad(i, 0, capacity) for i in ids]


def home(replica_ids: list[str], sequence_id: str) -> str:
    ranks = rank_replicas(idle(*replica_ids), sequence_id)
    assert ranks[0] == [rendezvous_order(replica_ids, sequence_id)[0]]
    return ranks[0][0]


def test_same_sequence_same_replica_whatever_the_order_or_load() -> None:
    ids = ["a1", "b2", "c3"]
    for seq in SEQUENCES[:200]:
        first = home(ids, seq)
        assert home(list(reversed(ids)), seq) == first
        # Load below capacity never moves a sequence off its home.
        busy = [ReplicaLoad(i, 15 if i == first else 0, 16) for i in ids]
        assert rank_replicas(busy, seq)[0] == [first]


@pytest.mark.parametrize("n", [2, 3, 4])
def test_sequences_spread_evenly(n: int) -> None:
    ids = [f"replica-{i}" for i in range(n)]
    counts = Counter(home(ids, s) for s in SEQUENCES)
    assert set(counts) == set(ids)
    fair = len(SEQUENCES) / n
    assert all(abs(c - fair) < 0.1 * fair for c in counts.values()), counts


def test_a_leaving_replica_moves_only_its_own_sequences() -> None:
    ids = ["r0", "r1", "r2", "r3"]
    before = {s: home(ids, s) for s in SEQUENCES}
    after = {s: home(["r0", "r1", "r3"], s) for s in SEQUENCES}
    moved = {s for s in SEQUENCES if before[s] != after[s]}
    assert moved == {s for s in SEQUENCES if before[s] == "r2"}
    # Its sequences spread over the survivors rather than landing on one of them.
    assert set(Counter(after[s] for s in moved)) == {"r0", "r1", "r3"}


def test_a_joining_replica_takes_about_one_share_and_only_for_itself() -> None:
    ids = ["r0", "r1", "r2"]
    before = {s: home(ids, s) for s in SEQUENCES}
    after = {s: home([*ids, "r3"], s) for s in SEQUENCES}
    moved = [s for s in SEQUENCES if before[s] != after[s]]
    assert all(after[s] == "r3" for s in moved)
    assert abs(len(moved) / len(SEQUENCES) - 1 / 4) < 0.03


def test_overflow_goes_to_the_least_loaded_others() -> None:
    replicas = [ReplicaLoad("a", 3, 16), ReplicaLoad("b", 7, 16), ReplicaLoad("c", 1, 16), ReplicaLoad("d", 16, 16)]
    for seq in SEQUENCES[:200]:
        preferred = rendezvous_order(["a", "b", "c", "d"], seq)[0]
        ranks = rank_replicas(replicas, seq)
        expected_others = [i for i in ["c", "a", "b", "d"] if i != preferred]
        if preferred == "d":
            # Its home is known to be full: the others first, least loaded first; home as last resort.
            assert ranks == [expected_others, ["d"]]
        else:
            assert ranks == [[preferred], expected_others]


def test_equal_loads_overflow_in_rendezvous_order() -> None:
    # A sequence whose home is busy keeps overflowing to the same second replica (its KV cache).
    ids = ["a", "b", "c", "d"]
    for seq in SEQUENCES[:100]:
        order = rendezvous_order(ids, seq)
        assert rank_replicas(idle(*ids), seq) == [[order[0]], order[1:]]


def test_without_sequence_id_least_loaded_first_with_random_ties() -> None:
    replicas = [ReplicaLoad("a", 5, 16), ReplicaLoad("b", 0, 16), ReplicaLoad("c", None, 16), ReplicaLoad("d", 2, 16)]
    rng = random.Random(0)
    firsts = Counter()
    for _ in range(400):
        (rank,) = rank_replicas(replicas, "", rng)
        assert rank[2:] == ["d", "a"]  # unknown queue length counts as idle, like Serve's probe-first
        firsts[rank[0]] += 1
    assert set(firsts) == {"b", "c"} and min(firsts.values()) > 100


def test_edge_cases() -> None:
    assert rank_replicas([], "seq") == [] and rank_replicas([], "") == []
    assert rank_replicas(idle("only"), "seq") == [["only"]]
    assert rank_replicas([ReplicaLoad("only", 9, 4)], "seq") == [["only"]]


def test_the_builder_wires_the_router_only_when_asked() -> None:
    on = pool_deployment_options(PoolConfig(model="demo:small_ft"))
    assert on["request_router_config"] == {"request_router_class": KV_AFFINITY_ROUTER}
    assert "request_router_config" not in pool_deployment_options(PoolConfig(model="demo:small_ft", kv_affinity=False))
    from ray._common.utils import import_module_and_attr
    from ray.serve.config import RequestRouterConfig

    assert import_module_and_attr(KV_AFFINITY_ROUTER)[1] is KvAffinityRouter
    # Serve accepts the option and imports the class itself.
    assert RequestRouterConfig(**on["request_router_config"]).get_serialized_request_router_cls()


# ------------------------------------------------------------------- the router over fake replicas


class FakeReplica:
    """What Serve's routing loop reads of a replica (`RunningReplica`'s surface)."""

    def __init__(self, unique_id: str, deployment_id, queue_len: int = 0, capacity: int = 4) -> None:
        from ray.serve._private.common import ReplicaID

        self.replica_id = ReplicaID(unique_id=unique_id, deployment_id=deployment_id)
        self.max_ongoing_requests = capacity
        self.queue_len = queue_len
        self.node_id = "node"
        self.availability_zone = None
        self.multiplexed_model_ids: set[str] = set()
        self.is_cross_language = False

    async def get_queue_len(self, *, deadline_s: float) -> int:
        await asyncio.sleep(0)
        return self.queue_len


def _router_and_replicas(queue_lens: dict[str, int]):
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID

    dep = DeploymentID(name="ModelPool", app_name="pool-test")
    router = KvAffinityRouter(
        deployment_id=dep, handle_source=DeploymentHandleSource.UNKNOWN, use_replica_queue_len_cache=True
    )
    replicas = {i: FakeReplica(i, dep, q) for i, q in queue_lens.items()}
    router.update_replicas(list(replicas.values()))
    return router, replicas


async def _route(router, session_id: str, internal_request_id: str) -> str:
    from ray.serve._private.common import RequestMetadata
    from ray.serve.request_router import PendingRequest

    meta = RequestMetadata(request_id="r", internal_request_id=internal_request_id, session_id=session_id)
    pr = PendingRequest(args=[], kwargs={}, metadata=meta)
    replica = await asyncio.wait_for(router._choose_replica_for_request(pr), timeout=5)
    return replica.replica_id.unique_id


async def test_router_sends_each_sequence_home_even_when_calls_share_a_request_id() -> None:
    # Handle calls made while serving one request inherit its internal_request_id; concurrent
    # calls of one coordinator request must each be routed (Serve's base matching would hang).
    router, _ = _router_and_replicas({"r0": 0, "r1": 0, "r2": 0})
    seqs = [f"seq-{i}" for i in range(8)]
    got = await asyncio.gather(*(_route(router, s, "shared-id") for s in seqs * 3))
    for s, replica in zip(seqs * 3, got):
        assert replica == rendezvous_order(["r0", "r1", "r2"], s)[0], (s, got)


async def test_router_skips_a_full_home_for_the_least_loaded_replica() -> None:
    router, replicas = _router_and_replicas({"r0": 0, "r1": 0, "r2": 0})
    seq = "seq-full"
    first, second, third = rendezvous_order(["r0", "r1", "r2"], seq)
    replicas[first].queue_len = 4  # at capacity (max_ongoing_requests)
    replicas[second].queue_len = 3
    assert await _route(router, seq, "a") == third
    replicas[first].queue_len = 0
    router.replica_queue_len_cache.update(replicas[first].replica_id, 0)
    assert await _route(router, seq, "b") == first


async def test_router_without_sequence_id_prefers_the_least_loaded() -> None:
    router, _ = _router_and_replicas({"r0": 3, "r1": 1, "r2": 2})
    assert {await _route(router, "", f"info-{i}") for i in range(5)} == {"r1"}
