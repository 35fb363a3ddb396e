"""Per-key quotas shared by every coordinator replica, with per-replica enforcement as the fallback.

Owns the decision of where a call is admitted — the shared store (`QuotaStore`: Redis in
`redis_quota_store`) while it answers, else this replica's `QuotaLimiter` — and the bookkeeping
that keeps the store true without a round trip per token: tokens a stream produces and leases
that end are queued here and sent by one background task (at once for an ended lease, every
`flush_interval_s` for tokens; a call's admission carries its key's queue too), and live leases
are refreshed every third of `lease_ttl_s`, so a crashed replica's streams free themselves when
their leases expire. Every call is also counted in the local limiter (unchecked while shared), so
a fallback starts from what this replica really runs. Transitions are logged once each and
reported to a `QuotaObserver` (the Prometheus metrics). Knows nothing of Redis, transports or keys.

Known looseness (documented in docs/quotas.md): while the store is unreachable each replica
enforces the full limits on its own; calls admitted then are registered in the store when it
answers again, and tokens counted then are sent (those older than a minute — a full refill — dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from eft_serve.auth.quotas import CONCURRENCY_RETRY_S, Lease, QuotaLimiter
from eft_serve.errors import RateLimited

log = logging.getLogger("eft_serve")

# A bucket refills completely in a minute: queued tokens older than this no longer matter.
_REFILL_S = 60.0


class QuotaStoreUnavailable(Exception):
    """The shared store did not answer (connection refused, timeout, error reply)."""


@dataclass(frozen=True)
class Verdict:
    """The store's answer to an admission: `reason` "tokens" (retry after `retry_after_s`) or
    "streams" (`open_streams` already open), or admitted (`ok`)."""

    ok: bool
    reason: str = ""
    retry_after_s: float = 0.0
    open_streams: int = 0


class QuotaStore(Protocol):
    """Atomic per-key operations on the shared state (one round trip each)."""

    async def admit(
        self,
        key_id: str,
        lease_id: str,
        ttl_s: float,
        max_streams: int,
        capacity: int,
        charge: int,
        releases: list[str],
    ) -> Verdict: ...

    async def sync(
        self, key_id: str, ttl_s: float, capacity: int, charge: int, releases: list[str], live: list[str]
    ) -> None: ...

    async def close(self) -> None: ...


class QuotaObserver(Protocol):
    def store_state(self, shared: bool) -> None:
        """The limiter switched to the shared store (True) or to per-replica enforcement (False)."""

    def local_decision(self) -> None:
        """One admission was decided per replica because the store did not answer."""


class NullQuotaObserver:
    def store_state(self, shared: bool) -> None:
        pass

    def local_decision(self) -> None:
        pass


@dataclass
class _KeyQueue:
    """What the store has not heard yet about one key."""

    capacity: int = 0  # the key's tokens per minute (0: no bucket)
    charge: int = 0
    charge_since: float = 0.0
    releases: dict[str, float] = field(default_factory=dict)  # lease id -> when it ended
    live: dict[str, SharedLease] = field(default_factory=dict)
    admitting: int = 0  # admissions awaiting the store (the queue must outlive them)

    def take(self, now: float, ttl_s: float) -> tuple[int, list[str]]:
        charge = self.charge if now - self.charge_since < _REFILL_S else 0
        # A lease the store has not heard end of for a TTL has expired there anyway.
        releases = [i for i, t in self.releases.items() if now - t < ttl_s]
        self.charge, self.releases = 0, {}
        return charge, releases

    def give_back(self, charge: int, releases: list[str], now: float) -> None:
        if charge:
            self.charge_since = self.charge_since if self.charge else now
            self.charge += charge
        for i in releases:
            self.releases.setdefault(i, now)


class SharedLease(Lease):
    """A call's lease: counted in the local limiter and (while it answers) in the shared store."""

    def __init__(self, owner: SharedQuotaLimiter, key_id: str, lease_id: str, local: Lease) -> None:
        super().__init__(None, key_id)
        self._owner = owner
        self.lease_id = lease_id
        self._local = local

    def charge(self, tokens: int) -> None:
        if tokens > 0 and not self.released:
            self._local.charge(tokens)
            self._owner._charged(self.key_id, tokens)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._local.release()
            self._owner._released(self)


class SharedQuotaLimiter:
    def __init__(
        self,
        store: QuotaStore,
        *,
        lease_ttl_s: float = 10.0,
        flush_interval_s: float = 0.25,
        retry_store_after_s: float = 1.0,
        observer: QuotaObserver | None = None,
        local: QuotaLimiter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._ttl_s = lease_ttl_s
        self._flush_s = flush_interval_s
        self._retry_s = retry_store_after_s
        self._observer = observer or NullQuotaObserver()
        self.local = local or QuotaLimiter(clock)
        self._clock = clock
        self._queues: dict[str, _KeyQueue] = {}
        self.shared = True  # until the store first fails to answer
        self._down_until = 0.0
        self._refresh_all = False  # after an outage: register every live lease at once
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._closing = False

    # ---- admission ------------------------------------------------------------------------

    async def lease(self, key_id: str, max_concurrent: int | None, tokens_per_minute: int | None) -> Lease:
        """A lease for one call, or `RateLimited` saying when to retry (cluster-wide while shared)."""
        self._start()
        q = self._queues.setdefault(key_id, _KeyQueue())
        q.capacity = tokens_per_minute or 0
        lease_id = uuid.uuid4().hex
        if self._store_usable():
            now = self._clock()
            charge, releases = q.take(now, self._ttl_s)
            q.admitting += 1
            try:
                verdict = await self._store.admit(
                    key_id, lease_id, self._ttl_s, max_concurrent or 0, q.capacity, charge, releases
                )
            except QuotaStoreUnavailable as e:
                # The script may have run before the answer was lost: release that id when it answers.
                q.give_back(charge, [*releases, lease_id], now)
                self._went_down(e)
            except BaseException:
                q.give_back(charge, [*releases, lease_id], now)  # cancelled: the id may be held there
                raise
            else:
                self._came_up()
                if not verdict.ok:
                    raise _refusal(key_id, verdict, max_concurrent, tokens_per_minute)
                return self._register(q, key_id, lease_id, max_concurrent, tokens_per_minute, enforce=False)
            finally:
                q.admitting -= 1
        self._observer.local_decision()
        return self._register(q, key_id, lease_id, max_concurrent, tokens_per_minute, enforce=True)

    def _register(
        self, q: _KeyQueue, key_id: str, lease_id: str, max_c: int | None, tpm: int | None, enforce: bool
    ) -> SharedLease:
        lease = SharedLease(self, key_id, lease_id, self.local.acquire(key_id, max_c, tpm, enforce=enforce))
        q.live[lease_id] = lease
        return lease

    # ---- what leases report (sync: called per chunk and from __del__) ---------------------

    def _charged(self, key_id: str, tokens: int) -> None:
        q = self._queues.get(key_id)
        if q is not None and q.capacity:
            q.give_back(tokens, [], self._clock())

    def _released(self, lease: SharedLease) -> None:
        q = self._queues.setdefault(lease.key_id, _KeyQueue())
        q.live.pop(lease.lease_id, None)
        q.give_back(0, [lease.lease_id], self._clock())
        self._poke()  # a freed slot should be visible to the other replicas at once

    # ---- the shared store's health ---------------------------------------------------------

    def _store_usable(self) -> bool:
        return self.shared or self._clock() >= self._down_until

    def _went_down(self, e: BaseException) -> None:
        self._down_until = self._clock() + self._retry_s
        if self.shared:
            self.shared = False
            log.warning(
                "quotas: the shared quota store did not answer (%s: %s); enforcing per replica "
                "(each replica allows a key its full limits) until it answers again",
                type(e).__name__,
                e,
            )
            self._observer.store_state(False)

    def _came_up(self) -> None:
        if not self.shared:
            self.shared = True
            self._refresh_all = True  # streams admitted meanwhile count cluster-wide from now on
            log.warning("quotas: the shared quota store answers again; quotas are cluster-wide again")
            self._observer.store_state(True)
            self._poke()

    # ---- the background task ---------------------------------------------------------------

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop, self._wake, self._closing = loop, asyncio.Event(), False
            self._task = loop.create_task(self._run(), name="eft-quota-sync")

    def _poke(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(wake.set)

    async def _run(self) -> None:
        assert self._wake is not None
        last_refresh = self._clock()
        # The flag, not cancellation alone, ends the loop: Python 3.11's wait_for can swallow a
        # cancel that arrives as the wake-up completes, and close() would then wait forever.
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._flush_s)
            self._wake.clear()
            refresh = self._refresh_all or self._clock() - last_refresh >= self._ttl_s / 3
            if refresh:
                last_refresh = self._clock()
            try:
                await self.flush(refresh)
            except Exception:  # a bug here must not stop renewals: every lease would expire
                log.exception("quotas: sending quota updates failed")

    async def flush(self, refresh: bool = False) -> None:
        """Send queued tokens and ended leases; with `refresh`, renew every live lease's TTL."""
        if refresh:
            self._refresh_all = False
        for key_id, q in list(self._queues.items()):
            if not (q.charge or q.releases or (refresh and q.live)):
                if not q.live and not q.admitting:
                    self._queues.pop(key_id, None)  # idle key: forget it
                continue
            if not self._store_usable():
                if refresh:
                    self._refresh_all = True  # try again once it answers
                return
            now = self._clock()
            charge, releases = q.take(now, self._ttl_s)
            live = list(q.live) if refresh else []
            try:
                await self._store.sync(key_id, self._ttl_s, q.capacity, charge, releases, live)
            except QuotaStoreUnavailable as e:
                q.give_back(charge, releases, now)
                self._went_down(e)
                if refresh:
                    self._refresh_all = True
                return
            self._came_up()

    def live_leases(self, key_id: str) -> int:
        q = self._queues.get(key_id)
        return len(q.live) if q else 0

    async def close(self) -> None:
        """Stop the background task (after sending what is queued) and close the store."""
        task, self._task = self._task, None
        if task is not None:
            self._closing = True
            task.cancel()
            await asyncio.wait([task], timeout=max(2 * self._flush_s, 1.0))
        with contextlib.suppress(Exception):
            await self.flush()
        await self._store.close()


def _refusal(key_id: str, v: Verdict, max_concurrent: int | None, tokens_per_minute: int | None) -> RateLimited:
    if v.reason == "tokens":
        return RateLimited(
            f"key {key_id!r} used its {tokens_per_minute} generated tokens per minute (across all replicas); "
            f"retry in {math.ceil(v.retry_after_s)} s",
            v.retry_after_s,
        )
    return RateLimited(
        f"key {key_id!r} already has {v.open_streams} of its {max_concurrent} concurrent calls open "
        f"(across all replicas); retry in {math.ceil(CONCURRENCY_RETRY_S)} s, after one of them ends",
        CONCURRENCY_RETRY_S,
    )
