"""Cancellation, retries and cache integrity over real gRPC pools on loopback (issue 11 items 4, 6).

Pools are real `ModelPool` gRPC servers around fake engines (a fake *model* only); the cache is a
real Redis where it matters. `CountingPool` wraps a real `GrpcPoolClient` to count the calls the
coordinator makes — it forwards every call unchanged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence

import pytest
import redis

from eft_serve.cache.codec import MAC_BYTES
from eft_serve.cache.config import CacheConfig
from eft_serve.cache.factory import build_next_token_cache
from eft_serve.cache.memory import MemoryCache
from eft_serve.cache.next_token_cache import NextTokenCache
from eft_serve.cache.redis_cache import frame_value, unframe_value
from eft_serve.config import CoordinatorConfig
from eft_serve.coordinator.request import GenerationRequest, MergeOptions
from eft_serve.coordinator.service import EftCoordinator
from eft_serve.engine.runner import EngineRunner
from eft_serve.engine.types import SequenceQuery, SequenceResult
from eft_serve.errors import DeadlineExceeded, InvalidArgument, PoolUnreachable, Unavailable
from eft_serve.testing.fake_engine import FakeEngine
from eft_serve.testing.grpc_coordinator import start_pool_server
from eft_serve.testing.grpc_pool import GrpcPoolClient
from eft_serve.transport.pool_rpc import PoolRpc

from fakes import RECIPES, CharTokenizer, fake_engines


class CountingPool:
    """A real `GrpcPoolClient`, with the calls made through it counted (and the queries kept)."""

    def __init__(self, inner: GrpcPoolClient) -> None:
        self.inner = inner
        self.role = inner.role
        self.calls = 0
        self.queries: list[SequenceQuery] = []

    async def info(self):
        return await self.inner.info()

    async def next_token_logprobs(
        self, queries: Sequence[SequenceQuery], logprob_top_k: int, deadline: float | None
    ) -> list[SequenceResult]:
        self.calls += 1
        self.queries.extend(queries)
        return await self.inner.next_token_logprobs(queries, logprob_top_k, deadline)

    async def draft(self, queries, deadline, score_logprob_top_k=None):
        return await self.inner.draft(queries, deadline, score_logprob_top_k)


async def _stack(engines: dict[str, FakeEngine], cache: NextTokenCache | None = None, **cfg: object):
    servers, pools = {}, {}
    for role, engine in engines.items():
        server, port = await start_pool_server(PoolRpc(engine, role))
        servers[role] = server
        pools[role] = CountingPool(GrpcPoolClient(f"127.0.0.1:{port}", role, timeout_s=5.0))
    config = CoordinatorConfig(**{"max_new_tokens_cap": 64, "pool_call_timeout_s": 2.0, **cfg})
    coord = EftCoordinator(pools, RECIPES, CharTokenizer(), config, cache=cache)
    await coord.start()
    return coord, servers, pools


async def _close(coord, servers, pools) -> None:
    await coord.stop()
    for p in pools.values():
        await p.inner.close()
    for s in servers.values():
        await s.stop(grace=None)


async def _complete(coord: EftCoordinator, prompt: str, **kw: object) -> list[int]:
    req = GenerationRequest(prompt=prompt, temperature=0.0, max_new_tokens=8, ignore_eos=True, **kw)
    return [t.token_id for chunk in [c async for c in await coord.generate(req)] for t in chunk.tokens]


async def test_a_dead_pool_is_retried_within_the_budget_and_a_slow_one_never() -> None:
    engines = fake_engines()
    coord, servers, pools = await _stack(engines, pool_call_retries=2, pool_call_retry_budget=0.0)
    try:
        assert await _complete(coord, "hello")  # all up
        await servers["small_base"].stop(grace=None)
        before = pools["small_base"].calls
        with pytest.raises(PoolUnreachable, match="small_base"):
            await _complete(coord, "hello again")
        # Connection refused is connection-level: retried (the budget's reserve allows it).
        assert pools["small_base"].calls - before == 3
        budget = coord._started()[1].fetcher.retry_budget
        assert budget is not None and budget.retries == 2
        # With a zero ratio the reserve (10) runs out: later calls fail at once, no retry storm.
        for _ in range(5):
            with pytest.raises(Unavailable):
                await _complete(coord, "and again")
        assert budget.retries == 10 and budget.denied >= 1
        calls = pools["small_base"].calls
        with pytest.raises(Unavailable):
            await _complete(coord, "once more")
        assert pools["small_base"].calls == calls + 1
    finally:
        await _close(coord, servers, pools)


async def test_a_timed_out_call_is_not_retried_and_its_siblings_are_cancelled() -> None:
    engines = fake_engines(small_ft=FakeEngine(68, seed=3, name="small_ft", eos_token_id=67, max_context=96))
    coord, servers, pools = await _stack(engines, pool_call_timeout_s=0.5, pool_call_retries=2)
    try:
        assert await _complete(coord, "hi")
        engines["small_ft"].delay_s = 1.5  # slower than pool_call_timeout_s
        before = {r: p.calls for r, p in pools.items()}
        started = time.monotonic()
        with pytest.raises(Unavailable, match="small_ft"):
            await _complete(coord, "hello there")
        assert time.monotonic() - started < 1.4  # did not wait for the slow engine, nor retry it
        assert pools["small_ft"].calls - before["small_ft"] == 1
        # Deadline: DEADLINE_EXCEEDED, never retried.
        with pytest.raises(DeadlineExceeded):
            await _complete(coord, "third try", timeout_s=0.3)
        engines["small_ft"].delay_s = 0.0
        await asyncio.sleep(1.6)  # the abandoned engine call finishes; the pool serves again
        assert await _complete(coord, "hi") == await _complete(coord, "hi")
    finally:
        await _close(coord, servers, pools)


async def test_a_queued_engine_call_whose_caller_is_gone_never_runs() -> None:
    engine = FakeEngine(30, seed=1, delay_s=0.4)
    runner = EngineRunner(engine, "large_base")
    q = [SequenceQuery([1, 2, 3])]
    first = asyncio.ensure_future(runner.next_token_logprobs(q, 5))
    await asyncio.sleep(0.05)  # first is on the engine
    queued = asyncio.ensure_future(runner.next_token_logprobs(q, 5))
    await asyncio.sleep(0.05)
    queued.cancel()  # its caller went away while it waited for the engine
    await first
    with pytest.raises(asyncio.CancelledError):
        await queued
    third = await runner.next_token_logprobs(q, 5)
    assert third and engine.num_calls == 2  # first and third ran; the cancelled one never started


async def test_score_asks_each_position_only_for_its_target() -> None:
    coord, servers, pools = await _stack(fake_engines())
    try:
        res = await coord.score("hello", " world wide", MergeOptions(logprob_top_k=0))
        cont = CharTokenizer().encode(" world wide")
        q = pools["large_base"].queries[-1]
        assert list(q.candidate_ids) == [] and [list(c) for c in q.position_candidate_ids] == [[t] for t in cont]
        assert [t.token_id for t in res.tokens] == cont and res.total_logprob < 0
        with pytest.raises(InvalidArgument):
            await coord.score("hello", "x" * 600, MergeOptions())
    finally:
        await _close(coord, servers, pools)


async def test_an_answer_from_new_weights_is_used_but_not_cached_under_the_old_key() -> None:
    engines = fake_engines()
    cache = NextTokenCache(MemoryCache(max_bytes=32 * 2**20, max_value_bytes=2**20, ttl_s=600))
    coord, servers, pools = await _stack(engines, cache=cache)
    try:
        old = coord.infos["large_base"].model_fingerprint
        expected = await _complete(coord, "abc")
        # A rolling upgrade: the pool now answers with other weights (same logits, new fingerprint).
        engine = engines["large_base"]
        engine._info = dataclasses.replace(engine.info, model_fingerprint="f" * 64)
        fetcher = coord._started()[1].fetcher
        keys_before = set(cache.backend._data) if hasattr(cache.backend, "_data") else None
        got = await _complete(coord, "xyz")  # nothing cached for this prompt: every step asks the pools
        assert got  # the client sees nothing break
        assert fetcher.fingerprint_mismatches == 1  # then Info was re-read: later steps match
        assert coord.infos["large_base"].model_fingerprint == "f" * 64 != old
        if keys_before is not None:
            new_keys = set(cache.backend._data) - keys_before
            assert new_keys and all(old not in k for k in new_keys)
            assert any(("f" * 64) in k for k in new_keys)
        assert await _complete(coord, "abc") == expected  # the old prompt re-asks under the new key
    finally:
        await _close(coord, servers, pools)


async def test_hmac_signed_values_in_redis(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EFT_TEST_CACHE_HMAC", "s3cret")
    cache = build_next_token_cache(CacheConfig(url=redis_url, hmac_key_env="EFT_TEST_CACHE_HMAC"))
    assert cache is not None
    coord, servers, pools = await _stack(fake_engines(), cache=cache)
    raw = redis.Redis.from_url(redis_url)
    try:
        expected = await _complete(coord, "signed")
        keys = raw.keys("eft:v1:*")
        assert keys
        # Every value is signed: forge each one in a well-formed Redis frame (so only the MAC
        # can tell): a genuine value moved under another key, or the payload without its MAC.
        values = {k: unframe_value(raw.get(k)) for k in keys}
        raw.set(keys[0], frame_value(values[keys[1]]))
        for k in keys[1:]:
            raw.set(k, frame_value(values[k][MAC_BYTES:]))
        calls = sum(p.calls for p in pools.values())
        assert await _complete(coord, "signed") == expected
        assert cache.bad_macs == len(keys)
        assert sum(p.calls for p in pools.values()) > calls  # misses: recomputed
        # ... and overwritten with signed values: the next run is all hits.
        calls = sum(p.calls for p in pools.values())
        assert await _complete(coord, "signed") == expected
        assert sum(p.calls for p in pools.values()) == calls and cache.bad_macs == len(keys)
    finally:
        raw.close()
        await _close(coord, servers, pools)
        await cache.close()


def test_missing_hmac_env_refuses_to_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EFT_TEST_CACHE_HMAC_MISSING", raising=False)
    with pytest.raises(ValueError, match="EFT_TEST_CACHE_HMAC_MISSING"):
        build_next_token_cache(CacheConfig(hmac_key_env="EFT_TEST_CACHE_HMAC_MISSING"))


async def test_exact_mode_refused_over_grpc_when_the_server_turns_it_off() -> None:
    import grpc

    from eft_serve.proto_gen.eft.v1 import eft_pb2, eft_pb2_grpc
    from eft_serve.testing.grpc_coordinator import start_coordinator_server
    from eft_serve.transport.coordinator_rpc import CoordinatorRpc

    coord, servers, pools = await _stack(fake_engines(), allow_exact_mode=False)
    server, port = await start_coordinator_server(CoordinatorRpc(coord))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = eft_pb2_grpc.EftServiceStub(channel)
            exact = eft_pb2.MergeParams(logprob_top_k=0)
            for call in (
                stub.Complete(eft_pb2.GenerateRequest(prompt="ab", merge=exact), timeout=10),
                stub.Score(eft_pb2.ScoreRequest(prompt="ab", continuation="c", merge=exact), timeout=10),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "logprob_top_k" in (err.value.details() or "")
            ok = await stub.Complete(
                eft_pb2.GenerateRequest(prompt="ab", merge=eft_pb2.MergeParams(logprob_top_k=5)), timeout=10
            )
            assert ok.usage.completion_tokens >= 1
    finally:
        await server.stop(grace=None)
        await _close(coord, servers, pools)
