"""One decoding step's pool traffic: result-cache lookup, parallel fan-out of misses, write-back.

Owns the per-step round trips: at most one cache lookup for every (model, sequence) of the step,
one concurrent call per model that still has misses, one cache write. Enforces the request
deadline and the per-call timeout so a dead pool becomes UNAVAILABLE, never a hang; a call that
times out is cancelled (the pool client cancels it downstream), and one failed call cancels its
siblings of the step. Retries only connection-level failures (`PoolUnreachable`: the wire is
stateless, another replica can answer) while the deadline and the shared `RetryBudget` allow.
Checks every answer's weights fingerprint against the pool's `Info`: an answer from other
weights (a rolling upgrade) is used but never cached, and the pool's `Info` is re-read so later
keys name the new weights.
Roles served by one pool (a base and its co-located LoRA adapters) share one call per step.
Knows nothing about merging; the cache is a `NextTokenCache` (keys and codec live there) or None.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from typing import TypeVar

from eft_serve.cache.next_token_cache import CachedQuery, NextTokenCache
from eft_serve.coordinator.pool_client import PoolClient, route
from eft_serve.coordinator.request import FetchStats
from eft_serve.coordinator.retry_budget import RetryBudget
from eft_serve.coordinator.telemetry import NULL_TELEMETRY, Telemetry, status_of
from eft_serve.deadline import seconds_left
from eft_serve.engine.types import DraftedSequence, DraftQuery, ModelInfo, SequenceQuery, SequenceResult
from eft_serve.errors import DeadlineExceeded, EftError, PoolUnreachable, PrefixUnknown, Unavailable

_RETRY_BACKOFF_S = 0.2
T = TypeVar("T")
log = logging.getLogger("eft_serve")


async def gather_cancelling(calls: Mapping[str, Awaitable[T]]) -> dict[str, T]:
    """Every call's result by key, run concurrently; the first failure cancels the others (each
    pool client cancels its call downstream), and so does this coroutine being cancelled.

    Raises the most actionable error: an `EftError` when any call raised one, else UNAVAILABLE.
    """
    tasks = {key: asyncio.ensure_future(call) for key, call in calls.items()}
    try:
        await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_EXCEPTION)
    finally:
        pending = [t for t in tasks.values() if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            # Let their cancellation run (downstream cancels) before the step reports.
            await asyncio.gather(*pending, return_exceptions=True)
    errors = [e for t in tasks.values() if not t.cancelled() and (e := t.exception()) is not None]
    for e in errors:
        if isinstance(e, EftError):
            raise e
    if errors:
        raise Unavailable(f"a model pool failed: {type(errors[0]).__name__}") from errors[0]
    return {key: t.result() for key, t in tasks.items()}


class StepFetcher:
    def __init__(
        self,
        pools: Mapping[str, PoolClient],
        infos: MutableMapping[str, ModelInfo],  # refreshed in place when a pool's weights change
        pool_call_timeout_s: float,
        cache: NextTokenCache | None = None,
        retries: int = 0,
        telemetry: Telemetry = NULL_TELEMETRY,
        retry_budget: RetryBudget | None = None,
    ) -> None:
        self._retries = retries
        # Shared by every request: retries add at most this fraction of calls (None = unbounded).
        self.retry_budget = retry_budget
        self.fingerprint_mismatches = 0  # answers from weights other than the pool's Info said
        self._telemetry = telemetry  # per-call latency and outcome, retries (metrics)
        self._pools = pools
        self._infos = infos
        self._timeout = pool_call_timeout_s
        self._cache = cache
        # Incremental prefixes a pool could not rebuild (resent whole): observability and tests.
        self.prefix_resends = 0

    async def _call(
        self,
        role: str,
        queries: list[SequenceQuery],
        logprob_top_k: int,
        deadline: float,
        stats: FetchStats,
        pool: PoolClient | None = None,
    ) -> list[SequenceResult]:
        pool = self._pools[role] if pool is None else pool
        try:
            return await self._with_retries(
                role, deadline, lambda: pool.next_token_logprobs(queries, logprob_top_k, deadline)
            )
        except PrefixUnknown:
            # The replica that answered does not hold the head we left out (it restarted, or the
            # sequence moved to another replica): resend whole prefixes — any replica can serve.
            self.prefix_resends += 1
            stats.pool_calls += 1
            full = [dataclasses.replace(q, known_prefix_length=0) for q in queries]
            return await self._with_retries(
                role, deadline, lambda: pool.next_token_logprobs(full, logprob_top_k, deadline)
            )

    def _host(self, role: str) -> tuple[str, PoolClient, str]:
        """The pool that carries `role`'s calls: (its name, its client, the adapter to tag)."""
        client = self._pools[role]
        host, adapter = route(client)
        if host is client:
            return role, client, ""
        return next((r for r, c in self._pools.items() if c is host), host.role), host, adapter

    async def draft(
        self, role: str, query: DraftQuery, deadline: float, stats: FetchStats, score_logprob_top_k: int | None = None
    ) -> DraftedSequence:
        """`query.num_tokens` greedy tokens of pool `role` after `query.token_ids` (never cached),
        scored by the drafter itself when `score_logprob_top_k` is given."""
        pool = self._pools[role]
        stats.pool_calls += 1
        drafts = await self._with_retries(
            role, deadline, lambda: pool.draft([query], deadline, score_logprob_top_k), kind="draft"
        )
        return drafts[0]

    async def _with_retries(
        self, role: str, deadline: float, call: Callable[[], Awaitable[T]], kind: str = "next_token"
    ) -> T:
        if self.retry_budget is not None:
            self.retry_budget.record_call()
        for attempt in range(self._retries + 1):
            try:
                return await self._call_once(role, deadline, call, kind)
            except PoolUnreachable as e:
                # Only connection-level failures: a timeout, a full queue, bad input or a passed
                # deadline would fail again (or add load to a pool that is already too slow).
                backoff = _RETRY_BACKOFF_S * 2**attempt
                if attempt == self._retries or seconds_left(deadline) <= backoff:
                    raise
                if self.retry_budget is not None and not self.retry_budget.try_retry():
                    raise
                self._telemetry.pool_retry(role, status_of(e))
                await asyncio.sleep(backoff)
        raise AssertionError("unreachable")

    async def _call_once(
        self, role: str, deadline: float, call: Callable[[], Awaitable[T]], kind: str = "next_token"
    ) -> T:
        remaining = seconds_left(deadline)
        if remaining <= 0:
            raise DeadlineExceeded("the request's deadline passed before the model pools answered")
        budget = min(remaining, self._timeout)
        started = time.perf_counter()
        failure: BaseException | None = None
        try:
            return await asyncio.wait_for(call(), timeout=budget)
        except TimeoutError:
            if budget >= remaining:
                failure = DeadlineExceeded(f"the request's deadline passed while waiting for model pool {role!r}")
            else:
                failure = Unavailable(
                    f"model pool {role!r} did not answer within {self._timeout:.0f}s; it may be down or overloaded"
                )
            raise failure from None
        except BaseException as e:
            failure = e
            raise
        finally:
            self._telemetry.pool_call(role, kind, time.perf_counter() - started, status_of(failure))

    async def _weights_match(self, role: str, results: Sequence[SequenceResult], deadline: float) -> bool:
        """True when every answer names the weights the pool's `Info` did (or names none).

        On a mismatch (a rolling upgrade reached this replica) the pool's `Info` is re-read, so
        later cache keys use the new fingerprint; an `Info` with another vocabulary cannot be
        merged with the other pools and fails the request."""
        expected = self._infos[role]
        seen = {r.model_fingerprint for r in results if r.model_fingerprint}
        if not seen or seen == {expected.model_fingerprint}:
            return True
        self.fingerprint_mismatches += 1
        log.warning(
            "model pool %r answered with weights %s but its Info named %s; re-reading Info",
            role,
            ",".join(sorted(f[:12] for f in seen)),
            expected.model_fingerprint[:12],
        )
        try:
            fresh = await asyncio.wait_for(
                self._pools[role].info(), max(0.001, min(seconds_left(deadline), self._timeout))
            )
        except (EftError, TimeoutError) as e:
            log.warning("re-reading model pool %r's Info failed (%s); kept the old one", role, type(e).__name__)
            return False
        if fresh.vocab_fingerprint != expected.vocab_fingerprint or fresh.vocab_size != expected.vocab_size:
            raise Unavailable(
                f"model pool {role!r} now serves a model with another vocabulary ({fresh.name}); it cannot be "
                "merged with the other pools: restart the coordinator once the upgrade is complete"
            )
        self._infos[role] = fresh
        return False

    async def fetch(
        self,
        role_queries: Mapping[str, Sequence[SequenceQuery]],
        logprob_top_k: int,
        deadline: float,
        use_cache: bool,
        stats: FetchStats,
    ) -> dict[str, list[SequenceResult]]:
        """Results per role, aligned with each role's queries."""
        out: dict[str, list[SequenceResult | None]] = {r: [None] * len(qs) for r, qs in role_queries.items()}
        cache = self._cache if use_cache else None
        slots = [(role, i) for role, qs in role_queries.items() for i in range(len(qs))]
        keys: dict[tuple[str, int], str] = {}
        before = cache.stats() if cache is not None else None
        if cache is not None:
            found = await cache.lookup(
                [
                    CachedQuery(
                        self._infos[role].model_fingerprint,
                        role_queries[role][i],
                        logprob_top_k,
                        self._infos[role].vocab_size,
                    )
                    for role, i in slots
                ]
            )
            keys = dict(zip(slots, found.keys))
            for (role, i), result in zip(slots, found.results):
                out[role][i] = result
            hits = sum(r is not None for r in found.results)
            stats.cache_hits += hits
            stats.cache_misses += len(slots) - hits
            stats.cache_errors += found.corrupt
        missing = {role: [i for i, r in enumerate(results) if r is None] for role, results in out.items()}
        # One call per pool: the roles a pool serves together (co-located LoRA adapters and
        # their base, `ColocatedRole`) share it, each sequence tagged with its adapter.
        hosts: dict[str, tuple[PoolClient, list[str]]] = {}
        for role, idx in missing.items():
            if idx:
                name, host, _ = self._host(role)
                hosts.setdefault(name, (host, []))[1].append(role)
        calls = {}
        for name, (host, roles) in hosts.items():
            queries = []
            for role in roles:
                adapter = self._host(role)[2]
                asked = [role_queries[role][i] for i in missing[role]]
                queries += [dataclasses.replace(q, adapter=adapter) for q in asked] if adapter else asked
            calls[name] = self._call(name, queries, logprob_top_k, deadline, stats, pool=host)
        if calls:
            stats.pool_calls += len(calls)
            by_host = await gather_cancelling(calls)
            answers: dict[str, list[SequenceResult]] = {}
            for name, (_, roles) in hosts.items():
                start = 0
                for role in roles:
                    answers[role] = by_host[name][start : start + len(missing[role])]
                    start += len(missing[role])
            fresh: list[tuple[str, SequenceResult]] = []
            for role, answer in answers.items():
                # An answer from other weights is still that pool's answer now (used, not
                # retried), but its key names the old weights: never cache it there.
                cacheable = await self._weights_match(role, answer, deadline)
                for i, result in zip(missing[role], answer):
                    out[role][i] = result
                    if cache is not None and cacheable:
                        fresh.append((keys[(role, i)], result))
            if cache is not None:
                await cache.store(fresh)
        if cache is not None and before is not None:
            # Backend errors and bypasses (Redis down) are counted by the cache itself; under
            # concurrent streams this per-stream attribution is approximate.
            d = cache.stats().delta(before)
            stats.cache_errors += d.errors + d.bypassed
            stats.cache_bytes_read += d.bytes_read
            stats.cache_bytes_written += d.bytes_written
        return {role: [r for r in results if r is not None] for role, results in out.items()}
