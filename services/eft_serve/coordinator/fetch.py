"""One decoding step's pool traffic: result-cache lookup, parallel fan-out of misses, write-back.

Owns the per-step round trips: at most one cache lookup for every (model, sequence) of the step,
one concurrent call per model that still has misses, one cache write. Enforces the request
deadline and the per-call timeout so a dead pool becomes UNAVAILABLE, never a hang, and retries
UNAVAILABLE calls while the deadline allows (the wire is stateless: any replica can answer).
Knows nothing about merging; the cache is a `NextTokenCache` (keys and codec live there) or None.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TypeVar

from eft_serve.cache.next_token_cache import CachedQuery, NextTokenCache
from eft_serve.coordinator.pool_client import PoolClient
from eft_serve.coordinator.request import FetchStats
from eft_serve.deadline import seconds_left
from eft_serve.engine.types import DraftedSequence, DraftQuery, ModelInfo, SequenceQuery, SequenceResult
from eft_serve.errors import DeadlineExceeded, EftError, PrefixUnknown, Unavailable

_RETRY_BACKOFF_S = 0.2
T = TypeVar("T")


class StepFetcher:
    def __init__(
        self,
        pools: Mapping[str, PoolClient],
        infos: Mapping[str, ModelInfo],
        pool_call_timeout_s: float,
        cache: NextTokenCache | None = None,
        retries: int = 0,
    ) -> None:
        self._retries = retries
        self._pools = pools
        self._infos = infos
        self._timeout = pool_call_timeout_s
        self._cache = cache
        # Incremental prefixes a pool could not rebuild (resent whole): observability and tests.
        self.prefix_resends = 0

    async def _call(
        self, role: str, queries: list[SequenceQuery], logprob_top_k: int, deadline: float, stats: FetchStats
    ) -> list[SequenceResult]:
        pool = self._pools[role]
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

    async def draft(
        self, role: str, query: DraftQuery, deadline: float, stats: FetchStats, score_logprob_top_k: int | None = None
    ) -> DraftedSequence:
        """`query.num_tokens` greedy tokens of pool `role` after `query.token_ids` (never cached),
        scored by the drafter itself when `score_logprob_top_k` is given."""
        pool = self._pools[role]
        stats.pool_calls += 1
        drafts = await self._with_retries(role, deadline, lambda: pool.draft([query], deadline, score_logprob_top_k))
        return drafts[0]

    async def _with_retries(self, role: str, deadline: float, call: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(self._retries + 1):
            try:
                return await self._call_once(role, deadline, call)
            except Unavailable:
                backoff = _RETRY_BACKOFF_S * 2**attempt
                if attempt == self._retries or seconds_left(deadline) <= backoff:
                    raise
                await asyncio.sleep(backoff)
        raise AssertionError("unreachable")

    async def _call_once(self, role: str, deadline: float, call: Callable[[], Awaitable[T]]) -> T:
        remaining = seconds_left(deadline)
        if remaining <= 0:
            raise DeadlineExceeded("the request's deadline passed before the model pools answered")
        budget = min(remaining, self._timeout)
        try:
            return await asyncio.wait_for(call(), timeout=budget)
        except TimeoutError:
            if budget >= remaining:
                raise DeadlineExceeded(f"the request's deadline passed while waiting for model pool {role!r}") from None
            raise Unavailable(
                f"model pool {role!r} did not answer within {self._timeout:.0f}s; it may be down or overloaded"
            ) from None

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
        calls = {
            role: self._call(role, [role_queries[role][i] for i in idx], logprob_top_k, deadline, stats)
            for role, idx in missing.items()
            if idx
        }
        if calls:
            stats.pool_calls += len(calls)
            answers = await asyncio.gather(*calls.values(), return_exceptions=True)
            errors = [a for a in answers if isinstance(a, BaseException)]
            if errors:
                # Prefer the most actionable error; anything unexpected is a pool failure.
                for e in errors:
                    if isinstance(e, EftError):
                        raise e
                raise Unavailable(f"a model pool failed: {type(errors[0]).__name__}") from errors[0]
            fresh: list[tuple[str, SequenceResult]] = []
            for role, answer in zip(calls, answers):
                assert not isinstance(answer, BaseException)
                for i, result in zip(missing[role], answer):
                    out[role][i] = result
                    if cache is not None:
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
