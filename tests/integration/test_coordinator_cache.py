"""The result cache under the coordinator, against a real Redis: same output, faults tolerated."""

from __future__ import annotations

import asyncio

import numpy as np
import redis

from eft_serve.cache.codec import decode_result, encode_result
from eft_serve.cache.config import CacheConfig
from eft_serve.cache.memory import MemoryCache
from eft_serve.cache.redis_cache import RedisCache, frame_value, unframe_value
from eft_serve.coordinator.request import GenerationRequest, MergeOptions, SpeculativeOptions
from eft_serve.engine.types import SequenceResult

from fakes import fake_coordinator, fake_engines


async def run(coord, **kw):
    stream = await coord.generate(GenerationRequest(prompt="hello", max_new_tokens=20, ignore_eos=True, **kw))
    chunks = [c async for c in stream]
    return [t.token_id for c in chunks for t in c.tokens], "".join(c.text for c in chunks), chunks[-1].usage


def redis_cache(url: str, **kw) -> RedisCache:
    return RedisCache(CacheConfig(url=url, op_timeout_s=0.2, reconnect_backoff_s=0.3, **kw))


async def test_cached_equals_uncached_greedy_and_seeded(redis_url: str) -> None:
    plain = fake_coordinator()
    await plain.start()
    engines = fake_engines()
    cached = fake_coordinator(engines, cache=redis_cache(redis_url))
    await cached.start()
    for kw in (
        dict(temperature=0),
        dict(temperature=1.0, seed=5),
        dict(temperature=0.7, seed=9, merge=MergeOptions(logprob_top_k=0)),
    ):
        expected = await run(plain, **kw)
        cold = await run(cached, **kw)
        calls_before = sum(e.num_calls for e in engines.values())
        warm = await run(cached, **kw)
        assert cold[:2] == expected[:2] == warm[:2]
        assert cold[2].fetch.cache_misses > 0
        assert warm[2].fetch.cache_hits == warm[2].completion_tokens * 3 and warm[2].fetch.cache_misses == 0
        assert warm[2].fetch.pool_calls == 0
        assert warm[2].fetch.cache_bytes_read > 0 and cold[2].fetch.cache_bytes_written > 0
        assert sum(e.num_calls for e in engines.values()) == calls_before


async def test_speculative_blocks_are_cached_and_served(redis_url: str) -> None:
    # A verified block is stored under its (prefix + draft, k + 1 positions) key; repeating the
    # request serves every block from Redis and only the (uncached) drafts reach a pool.
    engines = fake_engines()
    coord = fake_coordinator(engines, cache=redis_cache(redis_url))
    await coord.start()
    spec = SpeculativeOptions(enabled=True, max_draft_tokens=4, adaptive=False)
    uncached = fake_coordinator(engines)
    await uncached.start()
    plain = await run(uncached, temperature=0)
    try:
        cold = await run(coord, temperature=0, speculative=spec)
        warm = await run(coord, temperature=0, speculative=spec)
    finally:
        await coord.cache.close()
    assert cold[:2] == warm[:2] == plain[:2]
    spec_stats, usage = warm[2].speculation, warm[2]
    blocks = spec_stats.speculative_blocks
    # Each block yields its kept drafts + one token; the last token of the budget is a plain step.
    # A block asks the cache for the two pools that did not draft (the drafter scored its draft).
    plain_steps = usage.completion_tokens - spec_stats.accepted_tokens - blocks
    assert blocks > 0 and plain_steps >= 0
    assert usage.fetch.cache_hits == blocks * 2 + plain_steps * 3 and usage.fetch.cache_misses == 0
    assert warm[2].fetch.pool_calls == blocks  # the drafts only


async def test_in_process_lru_behind_same_interface() -> None:
    engines = fake_engines()
    coord = fake_coordinator(engines, cache=MemoryCache(max_bytes=8 * 2**20))
    await coord.start()
    first = await run(coord, temperature=0)
    second = await run(coord, temperature=0)
    assert first[:2] == second[:2] and second[2].fetch.cache_hits > 0 and second[2].fetch.pool_calls == 0


async def test_redis_killed_mid_stream_then_back(fresh_redis_server) -> None:
    plain = fake_coordinator()
    await plain.start()
    expected = await run(plain, temperature=0)
    coord = fake_coordinator(cache=redis_cache(fresh_redis_server.url))
    await coord.start()
    stream = await coord.generate(GenerationRequest(prompt="hello", max_new_tokens=20, ignore_eos=True, temperature=0))
    chunks = []
    async for c in stream:
        chunks.append(c)
        if len(chunks) == 5:
            fresh_redis_server.kill()
    ids = [t.token_id for c in chunks for t in c.tokens]
    assert ids == expected[0], "the stream must complete correctly without Redis"
    assert chunks[-1].usage.fetch.cache_misses > 0
    # Redis is back (empty): after the reconnect backoff, writes land and hits resume.
    fresh_redis_server.restart()
    await asyncio.sleep(0.5)
    await run(coord, temperature=0)
    again = await run(coord, temperature=0)
    assert again[0] == expected[0]
    assert again[2].fetch.cache_hits > 0


async def test_garbage_under_our_keys_is_ignored_and_overwritten(redis_url: str) -> None:
    coord = fake_coordinator(cache=redis_cache(redis_url))
    await coord.start()
    expected = await run(coord, temperature=0)
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match="eft:v1:*"))
    assert keys
    for i, key in enumerate(keys):
        client.set(key, b"\x00garbage" if i % 2 else b"EFTc\x01not-a-protobuf")
    polluted = await run(coord, temperature=0)
    assert polluted[:2] == expected[:2]
    healed = await run(coord, temperature=0)
    assert healed[:2] == expected[:2] and healed[2].fetch.cache_hits == healed[2].completion_tokens * 3
    client.close()


async def test_well_framed_values_of_the_wrong_shape_are_misses_never_errors(redis_url: str) -> None:
    # Values that pass the frame and CRC and parse as protobuf, but cannot be the answer stored
    # under their key (another writer, an old version, a bug): each is a miss, overwritten.
    coord = fake_coordinator(cache=redis_cache(redis_url))
    await coord.start()
    expected = await run(coord, temperature=0)
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match="eft:v1:*"))
    assert len(keys) >= 5

    def break_it(result: SequenceResult, how: int) -> SequenceResult:
        p = result.positions[0]
        if how == 0:
            return SequenceResult(positions=[])  # no positions
        if how == 1:
            return SequenceResult(positions=[p, p])  # more positions than asked
        if how == 2:
            p.top_ids = np.full_like(p.top_ids, 10_000)  # ids outside the vocabulary
        elif how == 3:
            p.top_logprobs = p.top_logprobs[:-1]  # lengths disagree
        else:
            p.top_logprobs = np.full_like(p.top_logprobs, np.nan)  # NaN logprobs
        return result

    for i, key in enumerate(keys):
        good = decode_result(unframe_value(client.get(key)))
        client.set(key, frame_value(encode_result(break_it(good, i % 5))))
    polluted = await run(coord, temperature=0)
    assert polluted[:2] == expected[:2] and polluted[2].fetch.cache_errors > 0
    healed = await run(coord, temperature=0)
    assert healed[:2] == expected[:2] and healed[2].fetch.cache_hits == healed[2].completion_tokens * 3
    client.close()
    await coord.cache.close()


async def test_cache_can_be_disabled_per_recipe(redis_url: str) -> None:
    engines = fake_engines()
    coord = fake_coordinator(engines, cache=redis_cache(redis_url))
    coord.cache.set_recipe_enabled("upscale", False)
    await coord.start()
    await run(coord, temperature=0)
    second = await run(coord, temperature=0)
    assert second[2].fetch.cache_hits == 0 and second[2].fetch.pool_calls > 0


async def test_score_honours_per_recipe_cache_switch(redis_url: str) -> None:
    from eft_serve.coordinator.request import MergeOptions as M

    coord = fake_coordinator(cache=redis_cache(redis_url))
    coord.cache.set_recipe_enabled("upscale", False)
    await coord.start()
    await coord.score("hello", " there", M())
    assert coord.cache.stats().sets == 0
    await coord.score("hello", " there", M(recipe="large_base"))
    assert coord.cache.stats().sets > 0
