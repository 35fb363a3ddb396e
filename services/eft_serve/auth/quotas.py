"""Per-key quotas: open calls at once, and generated tokens per minute (a token bucket).

Owns the per-process limiter state keyed by key id: alone it is each coordinator replica's own
limit (`auth.quota_store: local`); under `shared_quotas.SharedQuotaLimiter` it is the shadow count
of this replica's calls and the fallback while the shared store is unreachable. A call takes a `Lease` (one concurrency slot, refused when none is free or the bucket is
empty) and charges generated tokens to it as they come, so the bucket may go negative for the
call in flight; the next call waits until it has refilled. Release is idempotent. The clock is
injectable (tests). Knows nothing of transports or keys files.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from eft_serve.errors import RateLimited

# What a caller over its concurrency limit is told: a slot frees when one of its calls ends.
CONCURRENCY_RETRY_S = 1.0


@dataclass
class _Bucket:
    level: float
    updated: float


class Lease:
    """One admitted call: charge its generated tokens, release it when it ends (idempotent)."""

    def __init__(self, limiter: QuotaLimiter | None, key_id: str) -> None:
        self._limiter = limiter
        self.key_id = key_id
        self.released = False

    def charge(self, tokens: int) -> None:
        if self._limiter is not None and tokens > 0:
            self._limiter._charge(self.key_id, tokens)

    def release(self) -> None:
        if not self.released:
            self.released = True
            if self._limiter is not None:
                self._limiter._release(self.key_id)


NO_LIMIT = Lease(None, "")  # for callers without quotas (auth off, listing RPCs); charge/release are no-ops


class Limiter(Protocol):
    """What the gate takes leases from: this module's `QuotaLimiter` or the shared one."""

    async def lease(self, key_id: str, max_concurrent: int | None, tokens_per_minute: int | None) -> Lease: ...

    async def close(self) -> None: ...


class QuotaLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._rates: dict[str, float] = {}  # tokens per second, per key id with a bucket
        self._capacity: dict[str, float] = {}

    def acquire(
        self, key_id: str, max_concurrent: int | None, tokens_per_minute: int | None, enforce: bool = True
    ) -> Lease:
        """A lease for one call, or `RateLimited` saying when to retry.

        `enforce=False` counts the call without checking (the shared limiter already admitted it)."""
        with self._lock:
            if tokens_per_minute is not None and not enforce:
                self._refill(key_id, float(tokens_per_minute))
            elif tokens_per_minute is not None:
                level = self._refill(key_id, float(tokens_per_minute))
                if level < 1.0:
                    wait = (1.0 - level) / self._rates[key_id]
                    raise RateLimited(
                        f"key {key_id!r} used its {tokens_per_minute} generated tokens per minute; "
                        f"retry in {math.ceil(wait)} s",
                        wait,
                    )
            open_now = self._open.get(key_id, 0)
            if enforce and max_concurrent is not None and open_now >= max_concurrent:
                raise RateLimited(
                    f"key {key_id!r} already has {open_now} of its {max_concurrent} concurrent calls open; "
                    f"retry in {math.ceil(CONCURRENCY_RETRY_S)} s, after one of them ends",
                    CONCURRENCY_RETRY_S,
                )
            self._open[key_id] = open_now + 1
        return Lease(self, key_id)

    async def lease(self, key_id: str, max_concurrent: int | None, tokens_per_minute: int | None) -> Lease:
        """`acquire` behind the `Limiter` interface the gate awaits (no I/O here)."""
        return self.acquire(key_id, max_concurrent, tokens_per_minute)

    async def close(self) -> None:
        """Nothing to close (the `Limiter` interface)."""

    def open_calls(self, key_id: str) -> int:
        with self._lock:
            return self._open.get(key_id, 0)

    def tokens_left(self, key_id: str) -> float | None:
        """The bucket's level now (may be negative), None when the key has no token limit yet."""
        with self._lock:
            if key_id not in self._buckets:
                return None
            return self._refill(key_id, self._capacity[key_id])

    def _refill(self, key_id: str, capacity: float) -> float:
        now = self._clock()
        self._capacity[key_id] = capacity
        self._rates[key_id] = capacity / 60.0
        b = self._buckets.get(key_id)
        if b is None:
            b = self._buckets[key_id] = _Bucket(capacity, now)
        else:
            b.level = min(capacity, b.level + (now - b.updated) * self._rates[key_id])
            b.updated = now
        return b.level

    def _charge(self, key_id: str, tokens: int) -> None:
        with self._lock:
            if key_id in self._buckets:
                self._refill(key_id, self._capacity[key_id])
                self._buckets[key_id].level -= tokens

    def _release(self, key_id: str) -> None:
        with self._lock:
            n = self._open.get(key_id, 0) - 1
            if n > 0:
                self._open[key_id] = n
            else:
                self._open.pop(key_id, None)
