"""MemoryCache: byte-bounded LRU, TTL, stats; plus keys and config helpers."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from eft_serve.cache import (
    CacheConfig,
    CacheStats,
    MemoryCache,
    RedisCache,
    ResultCache,
    build_cache,
    candidates_shape,
    next_token_key,
)


def _size(key: str, value: bytes) -> int:
    return len(key.encode()) + len(value)


async def test_roundtrip_and_stats() -> None:
    c = MemoryCache(max_bytes=1000)
    assert isinstance(c, ResultCache)
    await c.set_many([("a", b"1"), ("b", b"22")])
    assert await c.get_many(["a", "x", "b"]) == [b"1", None, b"22"]
    s = c.stats()
    assert (s.hits, s.misses, s.sets, s.bytes_read, s.bytes_written) == (2, 1, 2, 3, 3)
    assert await c.get_many([]) == []


async def test_byte_bound_evicts_least_recently_used() -> None:
    v = b"x" * 90
    c = MemoryCache(max_bytes=3 * _size("k0", v))
    await c.set_many([("k0", v), ("k1", v), ("k2", v)])
    assert c.size_bytes == 3 * _size("k0", v)
    await c.get_many(["k0"])  # k0 becomes most recent; k1 is now the LRU entry
    await c.set_many([("k3", v)])
    assert await c.get_many(["k0", "k1", "k2", "k3"]) == [v, None, v, v]
    assert c.size_bytes <= 3 * _size("k0", v)
    assert c.stats().evictions == 1


async def test_overwrite_reaccounts_size() -> None:
    c = MemoryCache(max_bytes=1000)
    await c.set_many([("k", b"a" * 100)])
    await c.set_many([("k", b"b" * 10)])
    assert c.size_bytes == _size("k", b"b" * 10)
    assert len(c) == 1


async def test_big_value_evicts_many_and_oversize_is_skipped() -> None:
    c = MemoryCache(max_bytes=100, max_value_bytes=80)
    await c.set_many([(f"k{i}", b"v" * 20) for i in range(4)])
    await c.set_many([("big", b"B" * 70)])
    assert await c.get_many(["big"]) == [b"B" * 70]
    assert c.size_bytes <= 100
    await c.set_many([("huge", b"H" * 81)])  # over max_value_bytes: not stored
    assert await c.get_many(["huge"]) == [None]
    assert c.stats().oversize == 1


async def test_ttl_with_fake_clock() -> None:
    now = [100.0]
    c = MemoryCache(max_bytes=1000, ttl_s=10, clock=lambda: now[0])
    await c.set_many([("k", b"v")])
    now[0] = 109.9
    assert await c.get_many(["k"]) == [b"v"]
    now[0] = 110.0
    assert await c.get_many(["k"]) == [None]
    assert c.size_bytes == 0


async def test_stats_snapshot_and_delta() -> None:
    c = MemoryCache(max_bytes=1000)
    await c.set_many([("a", b"1")])
    before = c.stats()
    await c.get_many(["a", "b"])
    d = c.stats().delta(before)
    assert (d.hits, d.misses, d.sets) == (1, 1, 0)
    assert (c.stats() - before).hits == 1
    snap = before.snapshot()
    snap.hits += 5
    assert before.hits != snap.hits
    assert CacheStats(hits=3, misses=1).hit_rate == 0.75


def test_keys_are_stable_and_discriminating() -> None:
    shape = candidates_shape(20, None, 1)
    k1 = next_token_key("eft:v1:", "fp", [1, 2, 3], shape)
    assert k1 == next_token_key("eft:v1:", "fp", (1, 2, 3), shape)
    assert k1.startswith("eft:v1:fp:")
    others = {
        next_token_key("eft:v1:", "fp", [1, 2, 4], shape),
        next_token_key("eft:v1:", "fp", [1, 2], shape),
        next_token_key("eft:v1:", "fp2", [1, 2, 3], shape),
        next_token_key("eft:v1:", "fp", [1, 2, 3], candidates_shape(10, None, 1)),
        next_token_key("eft:v1:", "fp", [1, 2, 3], candidates_shape(20, [5, 6], 1)),
        next_token_key("eft:v1:", "fp", [1, 2, 3], candidates_shape(20, [6, 5], 1)),
        next_token_key("eft:v1:", "fp", [1, 2, 3], candidates_shape(20, [], 1)),
        next_token_key("eft:v1:", "fp", [1, 2, 3], candidates_shape(20, None, 2)),
    }
    assert k1 not in others and len(others) == 8
    # Pinned value: keys must not change across hosts/versions without a prefix bump.
    assert next_token_key("p:", "m", [0, 1, -1], "s") == "p:m:de0aef373f3ef6ab2f92d24b9d7472c2:4f04e0dc27ba"
    with pytest.raises(OverflowError):
        next_token_key("p:", "m", [2**31], "s")


def test_key_token_packing_is_int32_le() -> None:
    import hashlib
    import struct

    from eft_serve.cache.keys import tokens_digest

    ids = [1, 70000, -5]
    want = hashlib.blake2b(struct.pack("<3i", *ids), digest_size=16).hexdigest()
    assert tokens_digest(ids) == want


def test_config_validation_and_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = CacheConfig(recipes={"eft": False})
    assert cfg.resolved_backend() == "memory"
    assert not cfg.enabled_for("eft") and cfg.enabled_for("upscale")
    assert not CacheConfig(enabled=False).enabled_for("upscale")
    with pytest.raises(ValidationError):
        CacheConfig(bogus=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        CacheConfig(url="http://x")
    with pytest.raises(ValidationError):
        CacheConfig(backend="redis")
    with pytest.raises(ValidationError):
        CacheConfig(ttl_s=0)
    with pytest.raises(ValidationError):
        CacheConfig(password="a", password_env="B")  # type: ignore[arg-type]
    monkeypatch.setenv("EFT_TEST_PW", "s3cret")
    cfg = CacheConfig(url="redis://127.0.0.1:1", password_env="EFT_TEST_PW", tls=True)
    assert cfg.resolved_password() == "s3cret"
    assert cfg.effective_url() == "rediss://127.0.0.1:1" and cfg.uses_tls()
    assert "s3cret" not in repr(CacheConfig(password="s3cret"))  # type: ignore[arg-type]


def test_factory() -> None:
    assert build_cache(CacheConfig(enabled=False)) is None
    assert isinstance(build_cache(CacheConfig()), MemoryCache)
    assert isinstance(build_cache(CacheConfig(url="redis://127.0.0.1:1")), RedisCache)
    assert isinstance(build_cache(CacheConfig(url="redis://127.0.0.1:1", backend="memory")), MemoryCache)
