"""One decoding step's pool traffic: result-cache lookup, parallel fan-out of misses, write-back.

Owns the per-step round trips: at most one cache `get_many` for every (model, sequence) of the
step, one concurrent call per model that still has misses, one `set_many`. Enforces the request
deadline and the per-call timeout so a dead pool becomes UNAVAILABLE, never a hang. Knows
nothing about merging; the cache is any `ResultCache` (bytes in, bytes out) or None.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from eft_serve.cache.keys import candidates_shape, next_token_key
from eft_serve.coordinator.pool_client import PoolClient
from eft_serve.engine.types import ModelInfo, SequenceQuery, SequenceResult
from eft_serve.errors import DeadlineExceeded, EftError, Unavailable
from eft_serve.proto_gen.eft.v1 import pool_pb2
from eft_serve.transport.convert import result_from_proto, result_to_proto


_RETRY_BACKOFF_S = 0.2


@dataclass
class FetchStats:
    pool_calls: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    cache_errors: int = 0
    cache_bytes_read: int = 0
    cache_bytes_written: int = 0


class StepFetcher:
    def __init__(
        self,
        pools: Mapping[str, PoolClient],
        infos: Mapping[str, ModelInfo],
        pool_call_timeout_s: float,
        cache: Any | None = None,
        cache_key_prefix: str = "eft:v1:",
        retries: int = 0,
    ) -> None:
        self._retries = retries
        self._pools = pools
        self._infos = infos
        self._timeout = pool_call_timeout_s
        self._cache = cache
        self._prefix = cache_key_prefix

    def _key(self, role: str, q: SequenceQuery, top_k: int) -> str:
        shape = candidates_shape(top_k, q.candidate_ids, q.num_positions)
        return next_token_key(self._prefix, self._infos[role].model_fingerprint, q.token_ids, shape)

    async def _call(self, role: str, queries: list[SequenceQuery], top_k: int, deadline: float) -> list[SequenceResult]:
        for attempt in range(self._retries + 1):
            try:
                return await self._call_once(role, queries, top_k, deadline)
            except Unavailable:
                if attempt == self._retries or time.time() + _RETRY_BACKOFF_S * 2**attempt >= deadline:
                    raise
                await asyncio.sleep(_RETRY_BACKOFF_S * 2**attempt)
        raise AssertionError("unreachable")

    async def _call_once(self, role: str, queries: list[SequenceQuery], top_k: int, deadline: float) -> list[SequenceResult]:
        remaining = deadline - time.time()
        if remaining <= 0:
            raise DeadlineExceeded("the request's deadline passed before the model pools answered")
        budget = min(remaining, self._timeout)
        try:
            return await asyncio.wait_for(
                self._pools[role].next_token_logprobs(queries, top_k, deadline), timeout=budget
            )
        except asyncio.TimeoutError:
            if budget >= remaining:
                raise DeadlineExceeded(
                    f"the request's deadline passed while waiting for model pool {role!r}"
                ) from None
            raise Unavailable(
                f"model pool {role!r} did not answer within {self._timeout:.0f}s; it may be down or overloaded"
            ) from None

    async def fetch(
        self,
        role_queries: Mapping[str, Sequence[SequenceQuery]],
        top_k: int,
        deadline: float,
        use_cache: bool,
        stats: FetchStats,
    ) -> dict[str, list[SequenceResult]]:
        """Results per role, aligned with each role's queries."""
        out: dict[str, list[SequenceResult | None]] = {r: [None] * len(qs) for r, qs in role_queries.items()}
        keys: list[tuple[str, int, str]] = []
        cache = self._cache if use_cache else None
        before = cache.stats() if cache is not None else None
        if cache is not None:
            keys = [(r, i, self._key(r, q, top_k)) for r, qs in role_queries.items() for i, q in enumerate(qs)]
            values = await cache.get_many([k for _, _, k in keys])
            for (role, i, _), raw in zip(keys, values):
                if raw is None:
                    stats.cache_misses += 1
                    continue
                try:
                    out[role][i] = result_from_proto(pool_pb2.SequenceResult.FromString(raw))
                    stats.cache_hits += 1
                except Exception:  # a foreign or corrupted value: a miss, overwritten below
                    stats.cache_errors += 1
                    stats.cache_misses += 1
        missing = {
            role: [i for i, r in enumerate(results) if r is None] for role, results in out.items()
        }
        calls = {
            role: self._call(role, [role_queries[role][i] for i in idx], top_k, deadline)
            for role, idx in missing.items() if idx
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
            fresh: list[tuple[str, bytes]] = []
            key_of = {(r, i): k for r, i, k in keys}
            for role, answer in zip(calls, answers):
                assert not isinstance(answer, BaseException)
                for i, result in zip(missing[role], answer):
                    out[role][i] = result
                    if cache is not None:
                        fresh.append((key_of[(role, i)], result_to_proto(result).SerializeToString()))
            if cache is not None and fresh:
                await cache.set_many(fresh)
        if cache is not None and before is not None:
            # Backend errors and bypasses (Redis down) are counted by the cache itself; under
            # concurrent streams this per-stream attribution is approximate.
            d = cache.stats().delta(before)
            stats.cache_errors += d.errors + d.bypassed
            stats.cache_bytes_read += d.bytes_read
            stats.cache_bytes_written += d.bytes_written
        return {role: [r for r in results if r is not None] for role, results in out.items()}
