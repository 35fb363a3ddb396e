"""KV affinity across pool replicas: every call of one sequence lands on one replica (its KV cache).

Deploys its own two-replica `small_ft` pool application on the small_ft node group (the stack's
pools stay untouched), drives it from the test process through `ServePoolClient` (the coordinator's
client: it passes the sequence id to the KV-affinity router), and deletes the application at the end.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import Awaitable, Callable

import pytest

from eft_serve.config import PoolConfig
from eft_serve.engine.types import SequenceQuery
from eft_serve.proto_gen.eft.v1 import pool_pb2
from eft_serve.serve.kv_affinity_router import rendezvous_order
from eft_serve.serve.names import POOL_DEPLOYMENT, pool_app_name
from eft_serve.wire.pool_messages import results_to_proto

pytestmark = pytest.mark.cluster

ROLE = "kvtest_small_ft"  # its own app (`pool-kvtest_small_ft`), never part of the stack's config
SEQUENCES = 8
STEPS = 5
PROMPT_TOKENS = 12


def _pool(cluster_stack) -> PoolConfig:
    small_ft = cluster_stack["config"].pools["small_ft"]
    replica = dict(
        num_replicas=2,
        max_ongoing_requests=16,
        num_cpus=0.5,
        node_group_resource=small_ft.replica.node_group_resource,
    )
    return PoolConfig(model=small_ft.model, kv_cache_bytes=8 * 2**20, kv_affinity=True, replica=replica)


Call = Callable[[SequenceQuery], Awaitable[pool_pb2.NextTokenLogprobsResponse]]


async def _decode(call: Call, prompts: dict[str, list[int]]) -> dict[str, list[pool_pb2.NextTokenLogprobsResponse]]:
    """STEPS greedy steps of every sequence, all sequences concurrently at each step."""
    prefixes = {sid: list(p) for sid, p in prompts.items()}
    out: dict[str, list[pool_pb2.NextTokenLogprobsResponse]] = defaultdict(list)
    for _ in range(STEPS):
        sids = list(prefixes)
        answers = await asyncio.gather(
            *(call(SequenceQuery(token_ids=prefixes[s], num_positions=1, sequence_id=s)) for s in sids)
        )
        for sid, answer in zip(sids, answers):
            out[sid].append(answer)
            prefixes[sid].append(answer.sequences[0].positions[0].top_ids[0])
    return out


def _reuse(runs: dict[str, list[pool_pb2.NextTokenLogprobsResponse]]) -> float:
    """Prefix tokens served from the replica's KV cache / the most that could be, over steps 2.."""
    got = possible = 0
    for answers in runs.values():
        for step, a in enumerate(answers[1:], start=1):
            got += a.sequences[0].cached_tokens
            possible += PROMPT_TOKENS + step - 1  # all but the last token of the prefix
    return got / possible


def test_each_sequence_stays_on_one_replica_and_reuses_its_kv_cache(cluster_stack) -> None:
    from ray import serve

    from eft_serve.serve.app import pool_app
    from eft_serve.serve.local import wait_for_apps
    from eft_serve.serve.pool_handle import ServePoolClient

    app = pool_app_name(ROLE)
    pool = _pool(cluster_stack)
    try:
        serve.run(pool_app({"role": ROLE, "pool": pool.model_dump(mode="json")}), name=app, route_prefix=None)
        wait_for_apps([app], timeout_s=180)
        client = ServePoolClient(ROLE)
        # The baseline sends the same calls without a routing key (least loaded, random ties).
        plain = serve.get_deployment_handle(POOL_DEPLOYMENT, app_name=app).options(method_name="NextTokenLogprobs")

        async def routed(q: SequenceQuery) -> pool_pb2.NextTokenLogprobsResponse:
            return await client.next_token_logprobs_response([q], logprob_top_k=5, deadline=None)

        async def unrouted(q: SequenceQuery) -> pool_pb2.NextTokenLogprobsResponse:
            request = pool_pb2.NextTokenLogprobsRequest(
                sequences=[pool_pb2.SequenceQuery(sequence_id=q.sequence_id, token_ids=q.token_ids, num_positions=1)],
                logprob_top_k=5,
            )
            return pool_pb2.NextTokenLogprobsResponse.FromString(await plain.remote(request.SerializeToString()))

        async def scenario():
            vocab = (await client.info()).vocab_size
            # Both replica ids, from calls without a sequence id (they go to either replica).
            replicas: set[str] = set()
            probe_tokens = list(range(1, 61))
            for t in probe_tokens:
                if len(replicas) == 2:
                    break
                replicas.add((await routed(SequenceQuery(token_ids=[t], num_positions=1))).replica_id)
            assert len(replicas) == 2, f"calls without a sequence id only ever reached {replicas}"
            ids = sorted(replicas)
            # Sequence ids whose homes split evenly over the two replicas; prompts with distinct
            # first tokens, so no sequence can reuse another's prefix.
            rng = random.Random(7)
            first_tokens = rng.sample(range(len(probe_tokens) + 1, vocab), 3 * SEQUENCES)
            homes: dict[str, list[str]] = {r: [] for r in ids}
            n = 0
            while any(len(v) < SEQUENCES // 2 for v in homes.values()):
                sid = f"kv-seq-{n}"
                n += 1
                home = rendezvous_order(ids, sid)[0]
                if len(homes[home]) < SEQUENCES // 2:
                    homes[home].append(sid)
            sids = [s for v in homes.values() for s in v]

            def prompts(offset: int, tag: str) -> dict[str, list[int]]:
                return {
                    f"{tag}{sid}": [first_tokens[offset + i]] + [rng.randrange(vocab) for _ in range(PROMPT_TOKENS - 1)]
                    for i, sid in enumerate(sids)
                }

            affinity = await _decode(routed, prompts(0, ""))
            baseline = await _decode(unrouted, prompts(SEQUENCES, "plain-"))
            coalesced = await _decode(via_coalescer, prompts(2 * SEQUENCES, "co-"))
            return ids, affinity, baseline, coalesced

        async def via_coalescer(q: SequenceQuery) -> pool_pb2.NextTokenLogprobsResponse:
            # The coordinator's path: concurrent calls coalesced into one call per replica.
            return results_to_proto(await client.next_token_logprobs([q], logprob_top_k=5, deadline=None), "")

        ids, affinity, baseline, coalesced = asyncio.run(scenario())
    finally:
        serve.delete(app, _blocking=True)

    served = {sid: {a.replica_id for a in answers} for sid, answers in affinity.items()}
    print(f"\nreplicas {ids}; sequence -> replica: {served}")
    for sid, replicas in served.items():
        assert replicas == {rendezvous_order(ids, sid)[0]}, (sid, replicas)
    assert {r for v in served.values() for r in v} == set(ids), "both replicas should have served sequences"
    for sid, answers in affinity.items():
        assert answers[0].sequences[0].cached_tokens == 0, sid  # a fresh prompt
        assert all(a.sequences[0].cached_tokens > 0 for a in answers[1:]), (sid, answers)
    moved = sum(len({a.replica_id for a in answers}) > 1 for answers in baseline.values())
    with_affinity, without = _reuse(affinity), _reuse(baseline)
    print(
        f"prefix KV reuse, steps 2..{STEPS}: with affinity {with_affinity:.0%}, without (least loaded, "
        f"random ties) {without:.0%}; sequences spread over both replicas without affinity: {moved}/{SEQUENCES}"
    )
    assert with_affinity > 0.9
    assert with_affinity >= without
    # Coalesced: each sequence's first call alone, then at most one call per replica per step,
    # and the KV reuse of per-sequence routing (every shared call reached its members' replica).
    assert client.coalescer is not None
    sent = client.coalescer.calls_sent
    print(f"coalesced: {sent} pool calls for {SEQUENCES * STEPS}; prefix KV reuse {_reuse(coalesced):.0%}")
    assert sent <= SEQUENCES + len(ids) * (STEPS - 1)
    assert _reuse(coalesced) > 0.9
