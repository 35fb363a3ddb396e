"""Per-key quotas shared across coordinator replicas through a real Redis (loopback redis-server).

Each `SharedQuotaLimiter` here stands for one coordinator replica (its own Redis connection; in the
first test its own thread and event loop too): the stream limit holds in total, a token bucket is
spent once, a dead replica's leases expire, and Redis going away and coming back switches to
per-replica enforcement and back, logged and counted once per switch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
import redis

from eft_serve.auth.quotas import Lease
from eft_serve.auth.redis_quota_store import RedisQuotaStore
from eft_serve.auth.shared_quotas import SharedQuotaLimiter
from eft_serve.errors import RateLimited


class Recorder:
    def __init__(self) -> None:
        self.states: list[bool] = []
        self.local = 0

    def store_state(self, shared: bool) -> None:
        self.states.append(shared)

    def local_decision(self) -> None:
        self.local += 1


def _replica(url: str, ttl_s: float = 10.0, observer: Recorder | None = None) -> SharedQuotaLimiter:
    return SharedQuotaLimiter(
        RedisQuotaStore(url, op_timeout_s=0.5, prefix="t:quota:"),
        lease_ttl_s=ttl_s,
        flush_interval_s=0.05,
        retry_store_after_s=0.2,
        observer=observer,
    )


def _leases(url: str, key: str = "k") -> int:
    with redis.Redis.from_url(url) as r:
        now_ms = r.time()[0] * 1000
        return int(r.zcount(f"t:quota:{{{key}}}:leases", now_ms, "+inf"))


def _level(url: str, key: str = "k") -> float:
    with redis.Redis.from_url(url) as r:
        return float(r.hget(f"t:quota:{{{key}}}:bucket", "level"))


async def _try(limiter: SharedQuotaLimiter, max_streams: int | None, tpm: int | None = None) -> Lease | None:
    try:
        return await limiter.lease("k", max_streams, tpm)
    except RateLimited:
        return None


def test_two_replicas_racing_get_exactly_n_streams_in_all(redis_url: str) -> None:
    limit, attempts = 5, 24
    barrier = threading.Barrier(2)
    release = threading.Event()
    admitted: dict[str, int] = {}

    def replica(name: str) -> None:
        async def main() -> None:
            limiter = _replica(redis_url)
            barrier.wait()  # both replicas fire their attempts at once
            got = await asyncio.gather(*(_try(limiter, limit) for _ in range(attempts)))
            held = [g for g in got if g is not None]
            admitted[name] = len(held)
            await asyncio.to_thread(release.wait, 30)
            for lease in held:
                lease.release()
            await limiter.close()  # sends the releases

        asyncio.run(main())

    threads = [threading.Thread(target=replica, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while len(admitted) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sum(admitted.values()) == limit, admitted  # not 2 x limit: one count for both replicas
    assert _leases(redis_url) == limit
    release.set()
    for t in threads:
        t.join(30)
    assert _leases(redis_url) == 0  # every lease released in Redis


async def test_a_released_stream_frees_its_slot_for_the_other_replica_at_once(redis_url: str) -> None:
    a, b = _replica(redis_url), _replica(redis_url)
    try:
        held = await a.lease("k", 1, None)
        with pytest.raises(RateLimited, match="1 of its 1 concurrent calls open \\(across all replicas\\)"):
            await b.lease("k", 1, None)
        held.release()  # sent by a's background task, not on the next flush tick
        deadline = time.monotonic() + 2
        while _leases(redis_url) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        (await b.lease("k", 1, None)).release()
        # The same replica admits the next call even before its release was sent (carried along).
        (await b.lease("k", 1, None)).release()
        (await b.lease("k", 1, None)).release()
    finally:
        await a.close()
        await b.close()


async def test_a_token_bucket_is_spent_once_across_replicas(redis_url: str) -> None:
    a, b = _replica(redis_url), _replica(redis_url)
    try:
        first = await a.lease("k", None, 100)  # 100 tokens a minute, shared
        first.charge(60)
        first.release()
        second = await b.lease("k", None, 100)  # a's 60 carried by its flush or by this admission
        await asyncio.sleep(0.2)  # a's flush tick has certainly sent them
        assert _level(redis_url) < 41
        for _ in range(45):  # charged as the stream produces tokens, while it is still open
            second.charge(1)
        deadline = time.monotonic() + 2
        while _level(redis_url) > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert -6 < _level(redis_url) < 1  # 100 - 60 - 45 (+ a little refill): spent once, in Redis
        for replica in (a, b):  # neither replica's own share is left: per replica each would admit
            with pytest.raises(RateLimited, match="100 generated tokens per minute \\(across all replicas\\)") as e:
                await replica.lease("k", None, 100)
            assert 0.5 < e.value.retry_after_s < 5
        assert a.local.tokens_left("k") == pytest.approx(40, abs=1)  # what a replica alone would say
        second.release()
    finally:
        await a.close()
        await b.close()


async def test_a_dead_replicas_streams_are_released_after_the_lease_ttl(redis_url: str) -> None:
    dead, alive = _replica(redis_url, ttl_s=1.0), _replica(redis_url, ttl_s=1.0)
    other = _replica(redis_url, ttl_s=1.0)
    try:
        kept = [await alive.lease("k", 3, None)]
        _held = [await dead.lease("k", 3, None), await dead.lease("k", 3, None)]
        assert dead._task is not None
        dead._task.cancel()  # the replica dies: no release, no renewal
        with pytest.raises(RateLimited):
            await other.lease("k", 3, None)
        await asyncio.sleep(1.6)  # past the TTL: the dead replica's two leases expired ...
        assert _leases(redis_url) == 1  # ... while the live replica's was renewed (every TTL/3)
        got = [await other.lease("k", 3, None), await other.lease("k", 3, None)]
        with pytest.raises(RateLimited):
            await other.lease("k", 3, None)
        for lease in kept + got:
            lease.release()
    finally:
        for limiter in (alive, other, dead):
            await limiter.close()


async def test_redis_down_falls_back_per_replica_then_shares_again(fresh_redis_server, caplog) -> None:
    url = fresh_redis_server.url
    seen = Recorder()
    a, b = _replica(url, observer=seen), _replica(url)
    caplog.set_level(logging.WARNING, logger="eft_serve")
    try:
        first = await a.lease("k", 2, None)
        fresh_redis_server.kill()
        # Per replica now, counting what this replica already runs: one more, then full.
        second = await a.lease("k", 2, None)
        with pytest.raises(RateLimited, match="2 of its 2 concurrent calls"):
            await a.lease("k", 2, None)
        await asyncio.sleep(0.3)  # past the retry delay: the next admission tries Redis again
        with pytest.raises(RateLimited):
            await a.lease("k", 2, None)
        assert seen.states == [False] and seen.local == 3  # one switch, three local decisions
        fallbacks = [r for r in caplog.records if "enforcing per replica" in r.getMessage()]
        assert len(fallbacks) == 1  # logged once per switch, not per call

        fresh_redis_server.restart()  # same port, empty: it forgot every lease
        await asyncio.sleep(0.3)
        second.release()
        third = await a.lease("k", 2, None)  # decided in Redis again
        assert seen.states == [False, True] and seen.local == 3
        assert [r for r in caplog.records if "answers again" in r.getMessage()]
        deadline = time.monotonic() + 3
        while _leases(url) < 2 and time.monotonic() < deadline:  # a's live leases registered again
            await asyncio.sleep(0.02)
        assert _leases(url) == 2
        with pytest.raises(RateLimited, match="across all replicas"):
            await b.lease("k", 2, None)  # the other replica sees a's streams: shared again
        first.release()
        third.release()
    finally:
        await a.close()
        await b.close()
