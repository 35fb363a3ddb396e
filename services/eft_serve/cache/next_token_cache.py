"""Typed next-token results over any bytes `ResultCache`: keys, codec and the per-recipe switch.

Owns what the coordinator needs of a cache: look up a step's (model, query) pairs in one round
trip and get `SequenceResult`s or misses back, write fresh results in one round trip, say
whether a recipe may use the cache, and report per-call counters. Knows nothing of pools,
merging or which backend (Redis, in-process LRU) sits underneath.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from eft_serve.cache.base import CacheStats, ResultCache
from eft_serve.cache.codec import BadMac, CorruptValue, ExpectedShape, decode_checked, encode_result, sign, verify
from eft_serve.cache.keys import DEFAULT_KEY_PREFIX, candidates_shape, next_token_key
from eft_serve.engine.types import SequenceQuery, SequenceResult


@dataclass(frozen=True)
class CachedQuery:
    """One model's query of a step, with what besides the prefix shapes its answer."""

    model_fingerprint: str
    query: SequenceQuery
    logprob_top_k: int
    vocab_size: int

    def expected(self) -> ExpectedShape:
        return ExpectedShape(
            num_positions=self.query.num_positions,
            num_candidates=len(self.query.candidate_ids),
            logprob_top_k=self.logprob_top_k,
            vocab_size=self.vocab_size,
            position_candidates=tuple(len(c) for c in self.query.position_candidate_ids),
        )


@dataclass
class LookupOutcome:
    results: list[SequenceResult | None]
    corrupt: int  # values that were present but unusable (counted as misses), bad MACs included
    # The items' keys, aligned with `results`: `store` takes them back, so a step hashes each
    # prefix once (a key digests the whole token prefix).
    keys: list[str]
    bad_mac: int = 0  # of `corrupt`: values whose HMAC did not verify


class NextTokenCache:
    def __init__(
        self,
        backend: ResultCache,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        recipes: Mapping[str, bool] | None = None,
        hmac_key: bytes | None = None,
    ) -> None:
        self.backend = backend
        self._prefix = key_prefix
        self._recipes = dict(recipes or {})
        # With a key, values are signed on write and verified on read (`cache.hmac_key_env`).
        self._hmac_key = hmac_key
        self.bad_macs = 0  # values refused for their MAC since start (a miss each, then overwritten)

    def enabled_for(self, recipe: str) -> bool:
        """Whether requests of `recipe` read and write the cache (default: yes)."""
        return self._recipes.get(recipe, True)

    def set_recipe_enabled(self, recipe: str, enabled: bool) -> None:
        self._recipes[recipe] = enabled

    def key(self, item: CachedQuery) -> str:
        q = item.query
        shape = candidates_shape(item.logprob_top_k, q.candidate_ids, q.num_positions, q.position_candidate_ids)
        return next_token_key(self._prefix, item.model_fingerprint, q.token_ids, shape)

    async def lookup(self, items: Sequence[CachedQuery]) -> LookupOutcome:
        """Results aligned with `items`; None where missing or corrupt. Never raises for the backend."""
        keys = [self.key(i) for i in items]
        raw_values = await self.backend.get_many(keys)
        results: list[SequenceResult | None] = []
        corrupt = bad_mac = 0
        for key, item, raw in zip(keys, items, raw_values):
            if raw is None:
                results.append(None)
                continue
            try:
                payload = raw if self._hmac_key is None else verify(self._hmac_key, key, raw)
                result = decode_checked(payload, item.expected())
            except CorruptValue as e:
                corrupt += 1  # a miss now; the fresh result overwrites it
                bad_mac += isinstance(e, BadMac)
                results.append(None)
                continue
            results.append(result)
        self.bad_macs += bad_mac
        return LookupOutcome(results=results, corrupt=corrupt, keys=keys, bad_mac=bad_mac)

    async def store(self, items: Sequence[tuple[str, SequenceResult]]) -> None:
        """Write fresh results under the keys `lookup` returned, best-effort (the backend drops
        what it cannot store)."""
        if items:
            await self.backend.set_many([(key, self._seal(key, encode_result(r))) for key, r in items])

    def _seal(self, key: str, payload: bytes) -> bytes:
        return payload if self._hmac_key is None else sign(self._hmac_key, key, payload)

    def stats(self) -> CacheStats:
        return self.backend.stats()

    async def close(self) -> None:
        await self.backend.close()
