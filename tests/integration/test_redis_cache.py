"""RedisCache against a real loopback redis-server: roundtrip, TTL, corruption, outages."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import redis

from eft_serve.cache import CacheConfig, RedisCache, build_cache
from eft_serve.cache.redis_cache import frame_value
from eft_serve.infra.redis_server import LocalRedisServer

FAST = 0.5  # every call during an outage must return within this (op timeout is 0.05 s)


def _cfg(url: str, **kw: object) -> CacheConfig:
    return CacheConfig(url=url, **kw)  # type: ignore[arg-type]


async def _timed(coro):  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    result = await coro
    return result, time.monotonic() - t0


async def test_roundtrip_batched(redis_url: str) -> None:
    cache = build_cache(_cfg(redis_url))
    assert isinstance(cache, RedisCache)
    try:
        items = [(f"eft:v1:k{i}", bytes([i]) * (i + 1)) for i in range(5)]
        await cache.set_many(items)
        got = await cache.get_many(["eft:v1:k3", "eft:v1:nope", "eft:v1:k0"])
        assert got == [items[3][1], None, items[0][1]]
        s = cache.stats()
        assert (s.hits, s.misses, s.sets, s.errors, s.bypassed) == (2, 1, 5, 0, 0)
        assert s.bytes_read == 4 + 1
        with redis.Redis.from_url(redis_url) as raw:
            stored = raw.get("eft:v1:k3")
            assert stored == frame_value(items[3][1])  # framed, not the bare payload
            assert 0 < raw.ttl("eft:v1:k3") <= 3600
        assert await cache.get_many([]) == []
    finally:
        await cache.close()


async def test_ttl_honoured(redis_url: str) -> None:
    cache = RedisCache(_cfg(redis_url, ttl_s=1))
    try:
        await cache.set_many([("t", b"v")])
        assert await cache.get_many(["t"]) == [b"v"]
        with redis.Redis.from_url(redis_url) as raw:
            assert 0 < raw.pttl("t") <= 1000
        await asyncio.sleep(1.3)
        assert await cache.get_many(["t"]) == [None]
    finally:
        await cache.close()


async def test_garbage_value_is_a_counted_miss_then_overwritten(redis_url: str) -> None:
    cache = RedisCache(_cfg(redis_url))
    try:
        good = frame_value(b"payload")
        flipped = good[:-1] + bytes([good[-1] ^ 1])
        with redis.Redis.from_url(redis_url) as raw:
            raw.set("g1", b"\x00not ours at all")
            raw.set("g2", flipped)  # right header, bit-flipped payload: crc catches it
            raw.set("g3", good[:5])  # truncated header
        assert await cache.get_many(["g1", "g2", "g3"]) == [None, None, None]
        s = cache.stats()
        assert (s.corrupt, s.errors, s.misses, s.hits) == (3, 3, 3, 0)
        # A corrupt value does not trip the breaker: Redis itself is fine.
        await cache.set_many([("g1", b"fixed")])
        assert await cache.get_many(["g1"]) == [b"fixed"]
        assert cache.stats().bypassed == 0
    finally:
        await cache.close()


async def test_oversize_values_are_not_stored(redis_url: str) -> None:
    cache = RedisCache(_cfg(redis_url, max_value_bytes=100))
    try:
        await cache.set_many([("small", b"s" * 100), ("big", b"b" * 101)])
        assert await cache.get_many(["small", "big"]) == [b"s" * 100, None]
        assert cache.stats().oversize == 1 and cache.stats().sets == 1
    finally:
        await cache.close()


async def test_unreachable_redis_is_fast_and_silent() -> None:
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache = RedisCache(_cfg(f"redis://127.0.0.1:{port}", reconnect_backoff_s=5))
    try:
        got, dt = await _timed(cache.get_many(["a", "b"]))
        assert got == [None, None] and dt < FAST
        _, dt = await _timed(cache.set_many([("a", b"1")]))
        assert dt < FAST
        s = cache.stats()
        assert s.errors == 1 and s.bypassed == 1 and s.misses == 2
    finally:
        await cache.close()


async def test_kill_then_restart_recovers(fresh_redis_server: LocalRedisServer) -> None:
    server = fresh_redis_server
    backoff = 0.3
    cache = RedisCache(_cfg(server.url, reconnect_backoff_s=backoff))
    try:
        await cache.set_many([("k", b"v")])
        assert await cache.get_many(["k"]) == [b"v"]

        server.kill()
        got, dt = await _timed(cache.get_many(["k", "k2"]))
        assert got == [None, None] and dt < FAST
        assert cache.stats().errors == 1
        # Now "down": calls bypass without touching the network.
        _, dt = await _timed(cache.set_many([("k", b"v2")]))
        got, dt2 = await _timed(cache.get_many(["k"]))
        assert got == [None] and dt < 0.05 and dt2 < 0.05
        s = cache.stats()
        assert s.errors == 1 and s.bypassed == 2

        # Still dead after the backoff: one more quick failed try, then bypass again.
        await asyncio.sleep(backoff + 0.05)
        got, dt = await _timed(cache.get_many(["k"]))
        assert got == [None] and dt < FAST and cache.stats().errors == 2

        server.restart()  # same port, empty data
        assert server.url == cache._cfg.url
        deadline = time.monotonic() + 5
        hit = None
        while time.monotonic() < deadline:
            await cache.set_many([("k", b"back")])
            (hit,) = await cache.get_many(["k"])
            if hit is not None:
                break
            await asyncio.sleep(0.05)
        assert hit == b"back"
        before = cache.stats()
        assert await cache.get_many(["k"]) == [b"back"]
        d = cache.stats().delta(before)
        assert (d.hits, d.errors, d.bypassed) == (1, 0, 0)
    finally:
        await cache.close()


async def test_hung_server_op_timeout_is_bounded(fresh_redis_server: LocalRedisServer) -> None:
    server = fresh_redis_server
    cache = RedisCache(_cfg(server.url, op_timeout_s=0.05, reconnect_backoff_s=0.2))
    pid = server.pid
    assert pid is not None
    try:
        await cache.set_many([("k", b"v")])
        os.kill(pid, signal.SIGSTOP)  # accepts TCP (kernel backlog) but never answers
        try:
            got, dt = await _timed(cache.get_many(["k"]))
            assert got == [None] and dt < FAST
            await asyncio.sleep(0.25)
            _, dt = await _timed(cache.set_many([("k", b"w")]))
            assert dt < FAST
            s = cache.stats()
            assert s.errors == 2 and s.hits == 0
        finally:
            os.kill(pid, signal.SIGCONT)
        await asyncio.sleep(0.25)
        deadline = time.monotonic() + 5
        got = [None]
        while time.monotonic() < deadline and got[0] is None:
            got = await cache.get_many(["k"])
            await asyncio.sleep(0.05)
        # The timed-out SET may or may not have reached the server before the cancel.
        assert got[0] in (b"v", b"w")
    finally:
        await cache.close()


async def test_closed_cache_bypasses(redis_url: str) -> None:
    cache = RedisCache(_cfg(redis_url))
    await cache.set_many([("k", b"v")])
    await cache.close()
    assert await cache.get_many(["k"]) == [None]
    await cache.set_many([("k", b"v")])
    assert cache.stats().bypassed == 2
