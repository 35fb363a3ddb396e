"""Coordinator-side coalescing of concurrent streams' pool calls (coordinator.call_coalescer),
over a fake pool that routes by key like the KV-affinity router: shared calls per replica, each
caller its own answer, failures and cancellations per stream."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from eft_serve.coordinator.call_coalescer import CallCoalescer
from eft_serve.engine.types import SequenceQuery, SequenceResult
from eft_serve.errors import InvalidArgument, PrefixUnknown, Unavailable

# Where each sequence's own routing key lands (the fake's "rendezvous hashing").
HOME = {"a": "r0", "b": "r0", "c": "r1", "d": "r1"}


@dataclass
class FakePool:
    calls: list[tuple[list[str], int, float | None, str]] = field(default_factory=list)
    fail_for: set[str] = field(default_factory=set)  # sequences a shared call fails on
    down: bool = False
    cancelled: int = 0
    gate: asyncio.Event | None = None  # when set, calls wait for it

    async def send(
        self, queries: Sequence[SequenceQuery], top_k: int, deadline: float | None, key: str
    ) -> tuple[list[SequenceResult], str]:
        ids = [q.sequence_id for q in queries]
        self.calls.append((ids, top_k, deadline, key))
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(0.001)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.down:
            raise Unavailable("model pool 'x' is unavailable")
        if self.fail_for & set(ids):
            raise InvalidArgument(f"bad query in {ids}")
        # Each answer echoes its sequence (cached_tokens = the prompt length) and top_k.
        return [SequenceResult([], cached_tokens=len(q.token_ids) * 1000 + top_k) for q in queries], HOME[key]


def query(seq: str, n: int) -> SequenceQuery:
    return SequenceQuery(token_ids=list(range(n)), sequence_id=seq)


async def step(coalescer: CallCoalescer, lengths: dict[str, int], top_k: int = 5) -> dict[str, int]:
    results = await asyncio.gather(
        *(coalescer.next_token_logprobs([query(s, n)], top_k, 100.0 + n) for s, n in lengths.items())
    )
    return {s: r[0].cached_tokens for s, r in zip(lengths, results)}


async def test_streams_share_one_call_per_replica_after_their_first() -> None:
    pool = FakePool()
    sizes: list[int] = []
    coalescer = CallCoalescer(pool.send, on_send=sizes.append)
    lengths = {"a": 3, "b": 4, "c": 5, "d": 6}
    # First step: every sequence goes alone, by its own key (its placement is not known yet).
    assert await step(coalescer, lengths) == {s: n * 1000 + 5 for s, n in lengths.items()}
    assert sorted(key for _, _, _, key in pool.calls) == ["a", "b", "c", "d"]
    pool.calls.clear()
    for i in range(3):
        grown = {s: n + 1 + i for s, n in lengths.items()}
        assert await step(coalescer, grown) == {s: n * 1000 + 5 for s, n in grown.items()}
    # Then one call per replica per step, routed by a member whose own key reaches it.
    assert len(pool.calls) == 6
    for ids, _, _, key in pool.calls:
        assert len(ids) == 2 and all(HOME[s] == HOME[key] for s in ids)
    assert coalescer.calls_coalesced == 12
    assert sizes == [1] * 4 + [2] * 6  # what the metrics are told


async def test_shared_call_carries_the_latest_deadline_or_none() -> None:
    pool = FakePool()
    coalescer = CallCoalescer(pool.send)
    await step(coalescer, {"a": 3, "b": 4})
    pool.calls.clear()
    await asyncio.gather(
        coalescer.next_token_logprobs([query("a", 4)], 5, 10.0),
        coalescer.next_token_logprobs([query("b", 5)], 5, 20.0),
    )
    assert [c[2] for c in pool.calls] == [20.0]
    await asyncio.gather(
        coalescer.next_token_logprobs([query("a", 5)], 5, 10.0),
        coalescer.next_token_logprobs([query("b", 6)], 5, None),
    )
    assert pool.calls[-1][2] is None


async def test_different_top_k_never_share_a_call() -> None:
    pool = FakePool()
    coalescer = CallCoalescer(pool.send)
    await step(coalescer, {"a": 3, "b": 4})
    pool.calls.clear()
    got = await asyncio.gather(
        coalescer.next_token_logprobs([query("a", 4)], 5, 100.0),
        coalescer.next_token_logprobs([query("b", 5)], 7, 100.0),
    )
    assert [r[0].cached_tokens for r in got] == [4005, 5007]
    assert sorted(c[1] for c in pool.calls) == [5, 7]


async def test_full_vocabulary_calls_never_share_and_shared_calls_stay_bounded(monkeypatch) -> None:
    from eft_serve.coordinator import call_coalescer

    pool = FakePool()
    coalescer = CallCoalescer(pool.send)
    await step(coalescer, {"a": 3, "b": 4, "c": 5, "d": 6})
    pool.calls.clear()
    await step(coalescer, {"a": 4, "b": 5, "c": 6, "d": 7}, top_k=0)
    assert sorted(len(c[0]) for c in pool.calls) == [1, 1, 1, 1]
    pool.calls.clear()
    # Room for two answers of 5 entries (1 position × top-k 5) per shared call.
    monkeypatch.setattr(call_coalescer, "MAX_SHARED_ANSWER_ENTRIES", 10)
    home_r0 = {f"s{i}": 3 + i for i in range(5)}
    for seq in home_r0:
        monkeypatch.setitem(HOME, seq, "r0")
    await step(coalescer, home_r0)  # first calls: alone
    pool.calls.clear()
    got = await step(coalescer, {s: n + 1 for s, n in home_r0.items()})
    assert got == {s: (n + 1) * 1000 + 5 for s, n in home_r0.items()}
    assert sorted(len(c[0]) for c in pool.calls) == [1, 2, 2]


async def test_a_lone_stream_sends_one_call_per_step() -> None:
    pool = FakePool()
    coalescer = CallCoalescer(pool.send)
    for n in range(3, 8):
        assert await step(coalescer, {"c": n}) == {"c": n * 1000 + 5}
    assert len(pool.calls) == 5 and coalescer.calls_coalesced == 0


@pytest.mark.parametrize("error", [InvalidArgument, PrefixUnknown])
async def test_a_per_sequence_failure_is_resent_alone_and_fails_only_its_caller(error: type[Exception]) -> None:
    pool = FakePool()
    coalescer = CallCoalescer(pool.send)
    await step(coalescer, {"a": 3, "b": 4})
    pool.calls.clear()

    async def fail_b(queries, top_k, deadline, key):  # type: ignore[no-untyped-def]
        if "b" in [q.sequence_id for q in queries]:
            pool.calls.append(([q.sequence_id for q in queries], top_k, deadline, key))
            raise error("sequence b")
        return await pool.send(queries, top_k, deadline, key)

    coalescer._send = fail_b  # the same coalescer (placements known), a pool that rejects b
    a, b = await asyncio.gather(
        coalescer.next_token_logprobs([query("a", 4)], 5, 100.0),
        coalescer.next_token_logprobs([query("b", 5)], 5, 100.0),
        return_exceptions=True,
    )
    assert isinstance(a, list) and a[0].cached_tokens == 4005
    assert isinstance(b, error)
    # The shared call, then each alone.
    assert [c[0] for c in pool.calls] == [["a", "b"], ["a"], ["b"]]


async def test_a_pool_failure_reaches_every_caller_without_resending() -> None:
    pool = FakePool()
    coalescer = CallCoalescer(pool.send)
    await step(coalescer, {"a": 3, "b": 4})
    pool.calls.clear()
    pool.down = True
    got = await asyncio.gather(
        coalescer.next_token_logprobs([query("a", 4)], 5, 100.0),
        coalescer.next_token_logprobs([query("b", 5)], 5, 100.0),
        return_exceptions=True,
    )
    assert all(isinstance(g, Unavailable) for g in got)
    assert len(pool.calls) == 1


async def test_cancelled_callers_are_dropped_and_a_call_nobody_awaits_is_cancelled() -> None:
    pool = FakePool()
    coalescer = CallCoalescer(pool.send)
    await step(coalescer, {"a": 3, "b": 4})
    pool.calls.clear()
    # Cancelled before the flush: never sent.
    gone = asyncio.ensure_future(coalescer.next_token_logprobs([query("a", 4)], 5, 100.0))
    kept = asyncio.ensure_future(coalescer.next_token_logprobs([query("b", 5)], 5, 100.0))
    await asyncio.sleep(0)  # both enqueued, flush scheduled
    gone.cancel()
    assert (await kept)[0].cached_tokens == 5005
    assert [c[0] for c in pool.calls] == [["b"]]
    # Cancelled while the shared call runs: one leaving keeps it, all leaving cancel it.
    pool.gate = asyncio.Event()
    first = asyncio.ensure_future(coalescer.next_token_logprobs([query("a", 5)], 5, 100.0))
    second = asyncio.ensure_future(coalescer.next_token_logprobs([query("b", 6)], 5, 100.0))
    await asyncio.sleep(0.01)
    assert pool.calls[-1][0] == ["a", "b"]
    first.cancel()
    await asyncio.sleep(0.01)
    assert pool.cancelled == 0
    second.cancel()
    await asyncio.sleep(0.01)
    assert pool.cancelled == 1
    pool.gate.set()


async def test_a_sequence_served_away_from_its_own_replica_goes_alone() -> None:
    pool = FakePool()
    coalescer = CallCoalescer(pool.send)
    await step(coalescer, {"a": 3, "b": 4})
    real_send = pool.send

    async def overflow(queries, top_k, deadline, key):  # type: ignore[no-untyped-def]
        results, _ = await real_send(queries, top_k, deadline, key)
        return results, "r1"  # its replica was full: Serve sent the call elsewhere

    coalescer._send = overflow
    await step(coalescer, {"a": 4, "b": 5})  # one shared call, routed by a, answered by r1
    assert pool.calls[-1][0] == ["a", "b"]
    coalescer._send = real_send
    pool.calls.clear()
    await step(coalescer, {"a": 5, "b": 6})
    # a's own key reached r1, b's did not: b may not ride with a to r1, it goes by its own key.
    assert sorted((c[0], c[3]) for c in pool.calls) == [(["a"], "a"), (["b"], "b")]
