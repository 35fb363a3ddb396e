"""A replica-local, byte-bounded LRU of attention KV states keyed by token-id prefixes.

Owns: ``PrefixKVCache`` (store KV for a prefix, find the longest cached prefix of a new query,
evict least-recently-used entries to stay under a byte budget) and the conversions between a
transformers cache object and the immutable per-layer tensors it stores.

Does NOT know: models, forward passes, batching, or what the tokens mean. Results never depend on
it: a hit only saves recomputing a prefix that the engine would otherwise recompute identically.

Safety rule: an entry is a tuple of per-layer ``(keys, values)`` tensors that nobody mutates in
place (transformers' ``DynamicLayer.update`` rebinds via ``torch.cat``); every lookup builds a
fresh cache object, so two forward passes never share a mutable cache.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import DynamicCache

__all__ = [
    "KVLayers",
    "KVCacheStats",
    "PrefixKVCache",
    "cache_from_kv_layers",
    "kv_layers_from_cache",
    "kv_nbytes",
    "kv_seq_len",
    "slice_kv",
]

# One (keys, values) pair per layer, each [batch=1, heads, seq, head_dim].
KVLayers = tuple[tuple[torch.Tensor, torch.Tensor], ...]


def kv_layers_from_cache(cache: Any) -> KVLayers:
    """Per-layer (keys, values) of a transformers ``Cache``, a legacy tuple cache, or ``KVLayers``."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        out = []
        for i, layer in enumerate(layers):
            k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
            if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor) or k.ndim != 4:
                raise ValueError(
                    f"cache layer {i} ({type(layer).__name__}) holds no plain KV tensors; "
                    "only full-attention DynamicCache layers can be prefix-cached"
                )
            out.append((k, v))
        return tuple(out)
    if isinstance(cache, (tuple, list)):
        return tuple((kv[0], kv[1]) for kv in cache)
    raise TypeError(f"unsupported cache type {type(cache).__name__}")


def cache_from_kv_layers(layers: KVLayers) -> DynamicCache:
    """A fresh ``DynamicCache`` over ``layers`` (the tensors are shared, never mutated)."""
    return DynamicCache(ddp_cache_data=[(k, v) for k, v in layers])


def kv_nbytes(layers: KVLayers) -> int:
    return sum(k.nbytes + v.nbytes for k, v in layers)


def kv_seq_len(layers: KVLayers) -> int:
    return int(layers[0][0].shape[-2]) if layers else 0


def slice_kv(layers: KVLayers, n: int) -> KVLayers:
    """Views of the first ``n`` positions (no copy)."""
    return tuple((k[..., :n, :], v[..., :n, :]) for k, v in layers)


def _compact(t: torch.Tensor) -> torch.Tensor:
    # A view into a larger (e.g. batched) tensor would pin the whole storage while we only
    # count the view's bytes: copy so the byte budget is honest.
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.nbytes:
        return t.clone(memory_format=torch.contiguous_format)
    return t


def _lcp(a: np.ndarray, b: np.ndarray) -> int:
    m = min(a.shape[0], b.shape[0])
    if m == 0 or a[0] != b[0]:
        return 0
    neq = np.flatnonzero(a[:m] != b[:m])
    return int(neq[0]) if neq.size else m


@dataclass(frozen=True)
class KVCacheStats:
    hits: int = 0
    misses: int = 0
    # Prefix tokens served from the cache over all hits.
    hit_tokens: int = 0
    # Bytes held now (sum of tensor nbytes) and entries held now.
    bytes: int = 0
    entries: int = 0
    evictions: int = 0
    stores: int = 0
    # Entries refused because they alone exceed max_bytes.
    oversize: int = 0
    # Rows computed in a transient buffer (no room without evicting a running sequence).
    transient: int = 0
    # KV positions copied from one buffer to another (a shared head, a buffer outgrown).
    copied_tokens: int = 0


@dataclass
class _Entry:
    tokens: np.ndarray  # int64 [n]
    layers: KVLayers
    nbytes: int
    sequence_id: str


class PrefixKVCache:
    """LRU of (token prefix -> KV states), bounded by ``max_bytes`` of tensor data.

    Lookup scans all entries for the longest common prefix (preferring the query's own
    ``sequence_id`` entry on ties); ``max_entries`` keeps that scan short. Storing under a
    ``sequence_id`` replaces that sequence's previous entry, and any entry whose tokens are a
    prefix of the new one is dropped (the new entry serves every lookup it served).
    """

    def __init__(self, max_bytes: int, *, max_entries: int = 512) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_bytes = int(max_bytes)
        self.max_entries = int(max_entries)
        self._lock = threading.Lock()
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # LRU order: oldest first
        self._by_sequence: dict[str, int] = {}
        self._ids = itertools.count()
        self._bytes = 0
        self._hits = self._misses = self._hit_tokens = 0
        self._evictions = self._stores = self._oversize = 0

    # ------------------------------------------------------------------ lookup
    def lookup_layers(
        self, token_ids: Sequence[int] | np.ndarray, sequence_id: str = "", max_len: int | None = None
    ) -> tuple[int, KVLayers | None]:
        """Longest cached prefix of ``token_ids`` (capped at ``max_len``) as immutable views.

        Returns ``(cached_len, layers)`` with layers covering exactly ``token_ids[:cached_len]``,
        or ``(0, None)`` on a miss.
        """
        toks = np.asarray(token_ids, dtype=np.int64)
        cap = toks.shape[0] if max_len is None else max(0, min(int(max_len), toks.shape[0]))
        with self._lock:
            best_id, best_len = -1, 0
            own = self._by_sequence.get(sequence_id) if sequence_id else None
            if own is not None and own in self._entries:
                best_id, best_len = own, min(_lcp(self._entries[own].tokens, toks), cap)
            if best_len < cap:
                for eid, entry in self._entries.items():
                    if eid == own:
                        continue
                    n = min(_lcp(entry.tokens, toks), cap)
                    if n > best_len:
                        best_id, best_len = eid, n
                        if n == cap:
                            break
            if best_len == 0:
                self._misses += 1
                return 0, None
            entry = self._entries[best_id]
            self._entries.move_to_end(best_id)
            self._hits += 1
            self._hit_tokens += best_len
            layers = entry.layers
        if best_len == kv_seq_len(layers):
            return best_len, layers
        return best_len, slice_kv(layers, best_len)

    def lookup(
        self, token_ids: Sequence[int] | np.ndarray, sequence_id: str = "", max_len: int | None = None
    ) -> tuple[int, DynamicCache | None]:
        """Like ``lookup_layers`` but as a fresh ``DynamicCache`` owned by the caller."""
        n, layers = self.lookup_layers(token_ids, sequence_id, max_len)
        return n, (cache_from_kv_layers(layers) if layers is not None else None)

    # ------------------------------------------------------------------- store
    def store(self, token_ids: Sequence[int] | np.ndarray, cache: Any, sequence_id: str = "") -> bool:
        """Keep the KV of ``token_ids`` (``cache`` may hold more positions; they are cut off).

        Returns whether the entry is now held. Never keeps a reference to ``cache`` itself, only
        to its tensors, so the caller may go on using (and mutating) its cache object.
        """
        toks = np.array(token_ids, dtype=np.int64)  # a copy: callers may reuse their buffer
        n = toks.shape[0]
        if n == 0 or self.max_bytes <= 0:
            return False
        layers = kv_layers_from_cache(cache)
        if not layers:
            return False
        have = kv_seq_len(layers)
        if have < n:
            raise ValueError(f"cache holds {have} positions, fewer than the {n} tokens to store")
        if layers[0][0].shape[0] != 1:
            raise ValueError(f"store one sequence at a time (cache batch is {layers[0][0].shape[0]})")
        if have > n:
            layers = slice_kv(layers, n)
        nbytes = kv_nbytes(layers)
        if nbytes > self.max_bytes:
            with self._lock:
                self._oversize += 1
            return False
        layers = tuple((_compact(k), _compact(v)) for k, v in layers)

        with self._lock:
            # Already covered by a longer (or equal) entry: refresh it instead of duplicating.
            for eid, entry in self._entries.items():
                if entry.tokens.shape[0] >= n and _lcp(entry.tokens, toks) == n:
                    # No sequence alias to it: the map only points at an entry's own sequence.
                    self._entries.move_to_end(eid)
                    return True
            # Drop what the new entry supersedes: the sequence's old entry and dominated prefixes.
            doomed = [eid for eid, entry in self._entries.items() if _lcp(entry.tokens, toks) == entry.tokens.shape[0]]
            old = self._by_sequence.get(sequence_id) if sequence_id else None
            if old is not None and old not in doomed:
                doomed.append(old)
            for eid in doomed:
                self._remove(eid)
            eid = next(self._ids)
            self._entries[eid] = _Entry(toks, layers, nbytes, sequence_id)
            if sequence_id:
                self._by_sequence[sequence_id] = eid
            self._bytes += nbytes
            self._stores += 1
            while self._bytes > self.max_bytes or len(self._entries) > self.max_entries:
                oldest = next(iter(self._entries))
                self._remove(oldest)
                self._evictions += 1
            return True

    def _remove(self, eid: int) -> None:
        entry = self._entries.pop(eid)
        self._bytes -= entry.nbytes
        if entry.sequence_id and self._by_sequence.get(entry.sequence_id) == eid:
            del self._by_sequence[entry.sequence_id]

    # ------------------------------------------------------------------ admin
    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._by_sequence.clear()
            self._bytes = 0

    def stats(self) -> KVCacheStats:
        with self._lock:
            return KVCacheStats(
                hits=self._hits,
                misses=self._misses,
                hit_tokens=self._hit_tokens,
                bytes=self._bytes,
                entries=len(self._entries),
                evictions=self._evictions,
                stores=self._stores,
                oversize=self._oversize,
            )

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
