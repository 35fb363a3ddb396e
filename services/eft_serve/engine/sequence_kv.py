"""Per-sequence KV buffers under one byte budget, with admission: running sequences stay put.

Owns: one growable KV buffer per sequence (``[layers, 2, kv_heads, capacity, head_dim]``, written
in place as the sequence grows — a decode step writes its new positions and copies nothing),
the token ids those positions hold, longest-prefix sharing (a new sequence copies a shared head
from another entry once instead of recomputing it), the byte budget, and admission.

**Running vs idle.** A sequence is *running* while it is pinned by admission (``admit``) and was
used within its idle window: ``clamp(4 × its mean gap between calls, 1 s, 30 s)``, 10 s before a
second call shows its pace. So a stream that steps every 0.3 s is idle 1.2 s after its last step,
and one slowed down by load keeps its KV longer. Eviction (LRU) only ever takes *idle* entries
(sequences that finished, anonymous one-shot queries, entries never admitted): a running
sequence's KV is never evicted to make room for another.

**Admission.** ``admit`` answers, without waiting, whether a call's sequences fit: a new sequence
needs its length in bytes free of running sequences' reservations, within ``1 − GROWTH_RESERVE``
of the budget (the rest is kept for running sequences to grow into); a running one growing past
its buffer may use the whole budget. Admitted sequences are pinned with a reservation; the caller
(``EngineRunner``) waits and retries, or gives up with RESOURCE_EXHAUSTED. Queries without a
sequence id are one-shot: never pinned, never blocked — when nothing idle can be evicted for them
they run in a transient buffer that is dropped after the call. A sequence larger than the whole
budget is likewise computed transiently (uncached) rather than refused.

Does NOT know: models, forward passes, queues or waiting. Results never depend on it: a hit only
saves recomputing positions the engine would compute identically.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from eft_serve.engine.kv_cache import KVCacheStats
from eft_serve.engine.types import Admission

__all__ = ["KVGeometry", "Admission", "Lease", "SequenceKVStore", "GROWTH_RESERVE"]

# Share of the budget new sequences may not claim: running sequences grow into it.
GROWTH_RESERVE = 0.1
FIRST_IDLE_S = 10.0
MIN_IDLE_S = 1.0
MAX_IDLE_S = 30.0
IDLE_GAPS = 4.0
_ALIGN = 16  # capacities are multiples of this many positions


@dataclass(frozen=True)
class KVGeometry:
    """Shape of one model's KV: what a position costs and how to allocate buffers."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    max_positions: int

    @property
    def bytes_per_token(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.layers * 2 * self.kv_heads * self.head_dim * itemsize

    def allocate(self, capacity: int) -> torch.Tensor:
        return torch.empty(
            (self.layers, 2, self.kv_heads, capacity, self.head_dim), dtype=self.dtype, device=self.device
        )


@dataclass
class _Entry:
    key: int
    sequence_id: str
    tokens: np.ndarray  # int64 [capacity]; positions [:length] hold valid KV in buf
    length: int
    buf: torch.Tensor | None
    capacity: int
    last_used: float
    reserved: int = 0  # positions reserved by admission (counted before they are allocated)
    pinned: bool = False
    gap: float | None = None  # mean seconds between admitted calls
    last_admit: float | None = None
    busy: int = 0  # forwards in flight using this entry (never evicted meanwhile)
    # Whose weights computed this KV (a co-located LoRA adapter's name, "" = the model's own):
    # prefixes are shared only within one namespace.
    namespace: str = ""


@dataclass
class Lease:
    """One row of one forward: its buffer, the cached positions ``[0, start)`` and the entry to
    commit to (``None``: a transient buffer, dropped after the call)."""

    buf: torch.Tensor
    start: int
    entry: _Entry | None


class SequenceKVStore:
    def __init__(
        self,
        max_bytes: int,
        geometry: KVGeometry,
        *,
        max_entries: int = 512,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self.geometry = geometry
        self.bytes_per_token = geometry.bytes_per_token
        self.max_entries = max(1, int(max_entries))
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # LRU order: oldest first
        self._by_sequence: dict[str, _Entry] = {}
        self._keys = itertools.count()
        self._bytes = 0
        self._hits = self._misses = self._hit_tokens = 0
        self._evictions = self._stores = self._oversize = self._transient_rows = self._copied = 0

    # ------------------------------------------------------------------ policy
    def _window(self, e: _Entry) -> float:
        if e.gap is None:
            return FIRST_IDLE_S
        return min(MAX_IDLE_S, max(MIN_IDLE_S, IDLE_GAPS * e.gap))

    def _running(self, e: _Entry, now: float) -> bool:
        return e.busy > 0 or (e.pinned and now - e.last_used < self._window(e))

    def _held(self, e: _Entry) -> int:
        return max(e.capacity, e.reserved) * self.bytes_per_token

    def _capacity_for(self, n: int) -> int:
        want = n + max(_ALIGN, n // 4)  # headroom: a growing sequence reallocates rarely
        want = -(-want // _ALIGN) * _ALIGN
        return max(n, min(want, self.geometry.max_positions))

    # --------------------------------------------------------------- admission
    def admit(self, demands: Sequence[tuple[str, int]]) -> Admission:
        """Pin and reserve room for each ``(sequence_id, positions)`` that fits; ``ok`` when all
        did. Never waits and never evicts a running sequence (idle ones are evicted lazily)."""
        if self.max_bytes <= 0:
            return Admission(ok=True, max_bytes=0)
        now = self._clock()
        bpt = self.bytes_per_token
        with self._lock:
            running = [e for e in self._entries.values() if self._running(e, now)]
            held = sum(self._held(e) for e in running)
            blocked = need = 0
            for sid, n in demands:
                if not sid:
                    continue  # one-shot: never blocked (transient when there is no room)
                e = self._by_sequence.get(sid)
                was_running = e is not None and self._running(e, now)
                cur = self._held(e) if e is not None and was_running else 0
                want = max(n, e.capacity if e is not None else 0, e.reserved if e is not None else 0)
                extra = want * bpt - cur
                if n * bpt > self.max_bytes * (1 - GROWTH_RESERVE):
                    continue  # can never be cached: computed transiently, not refused
                limit = self.max_bytes if was_running else self.max_bytes * (1 - GROWTH_RESERVE)
                if held + extra > limit:
                    blocked += 1
                    need += extra
                    continue
                if e is None:
                    e = self._new_entry(sid, now)
                # A step is an admission of a longer sequence: re-checks of the same length (a
                # batch re-admitted as a whole, a retry) do not shorten the measured pace.
                if n > e.reserved:
                    if e.last_admit is not None:
                        gap = now - e.last_admit
                        e.gap = gap if e.gap is None else 0.5 * e.gap + 0.5 * gap
                    e.last_admit = now
                e.reserved = max(e.reserved, n)
                e.pinned = True
                e.last_used = now
                self._entries.move_to_end(e.key)
                if not was_running:
                    running.append(e)
                held += extra
            return Admission(
                ok=blocked == 0,
                blocked=blocked,
                need_bytes=need,
                running=len(running),
                running_bytes=held,
                max_bytes=self.max_bytes,
            )

    # ------------------------------------------------------------------ leases
    def acquire(
        self,
        sequence_id: str,
        tokens: np.ndarray,
        max_reuse: int,
        continue_from: Lease | None = None,
        namespace: str = "",
    ) -> Lease:
        """A buffer with room for all of ``tokens`` whose first ``start`` positions (at most
        ``max_reuse``) already hold their KV: the sequence's own, or a shared head copied once.
        ``continue_from``: the previous lease of this row in the same call (a draft's next step),
        whose entry is the row's own even without a sequence id. ``namespace``: whose weights the
        row runs (an adapter); heads are shared only from entries of the same namespace, and the
        caller keeps sequence ids of different namespaces apart."""
        n = int(tokens.shape[0])
        now = self._clock()
        with self._lock:
            own = self._by_sequence.get(sequence_id) if sequence_id else None
            prev = continue_from.entry if continue_from is not None else None
            if prev is not None and prev.key in self._entries:
                own = prev
            if own is not None and own.busy:
                own, sequence_id = None, ""  # the same id twice in one call: the second is one-shot
            if own is not None:
                own.namespace = namespace  # admission may have made the entry without knowing it
            start, src = 0, own
            if own is not None and own.length:
                start = min(_lcp(own.tokens[: own.length], tokens), max_reuse)
            if start < max_reuse:
                for e in self._entries.values():
                    if e is own or not e.length or e.namespace != namespace:
                        continue
                    m = min(_lcp(e.tokens[: e.length], tokens), max_reuse)
                    if m > start:
                        start, src = m, e
                        if m == max_reuse:
                            break
            if start:
                self._hits += 1
                self._hit_tokens += start
                assert src is not None
                self._entries.move_to_end(src.key)
            else:
                self._misses += 1

            target = own
            if target is not None and src is target and target.capacity >= n and target.buf is not None:
                target.length = start  # positions from start on are rewritten by this forward
                target.busy += 1
                target.last_used = now
                self._entries.move_to_end(target.key)
                return Lease(target.buf, start, target)

            cap = self._capacity_for(n)
            if self.max_bytes <= 0 or n * self.bytes_per_token > self.max_bytes:
                if self.max_bytes > 0:
                    self._oversize += 1
                return self._transient(n, src, start)
            old = target.capacity * self.bytes_per_token if target is not None else 0
            protect = {e.key for e in (target, src) if e is not None}
            if not self._make_room(cap * self.bytes_per_token - old, protect, now):
                cap = n
                if not self._make_room(cap * self.bytes_per_token - old, protect, now):
                    return self._transient(n, src, start)
            if target is None:
                target = self._new_entry(sequence_id, now)
                target.namespace = namespace
            buf = self.geometry.allocate(cap)
            toks = np.zeros(cap, dtype=np.int64)
            if start and src is not None and src.buf is not None:
                buf[:, :, :, :start] = src.buf[:, :, :, :start]
                toks[:start] = src.tokens[:start]
                self._copied += start
            self._bytes += cap * self.bytes_per_token - old
            target.buf, target.tokens, target.capacity, target.length = buf, toks, cap, start
            target.busy += 1
            target.last_used = now
            self._entries.move_to_end(target.key)
            self._evict_extra_entries(now)
            return Lease(buf, start, target)

    def cached_length(self, sequence_id: str, tokens: np.ndarray) -> int:
        """How many leading positions of ``tokens`` the sequence's own entry already holds (shared
        heads of other entries are not counted: an estimate for prefill chunking, never a lease)."""
        with self._lock:
            own = self._by_sequence.get(sequence_id) if sequence_id else None
            if own is None or not own.length:
                return 0
            return _lcp(own.tokens[: own.length], tokens)

    def commit(self, lease: Lease, tokens: np.ndarray) -> None:
        """The forward wrote positions ``[start, len(tokens))``: they now hold ``tokens``' KV."""
        e = lease.entry
        if e is None:
            return
        n = int(tokens.shape[0])
        with self._lock:
            e.busy -= 1
            if e.key not in self._entries:
                return
            e.tokens[lease.start : n] = tokens[lease.start : n]
            e.length = n
            e.last_used = self._clock()
            self._stores += 1
            if not e.sequence_id:
                self._drop_dominated(e)

    def release(self, lease: Lease) -> None:
        """The forward failed: the entry keeps only what it held before (``[0, start)``)."""
        if lease.entry is not None:
            with self._lock:
                lease.entry.busy -= 1

    # --------------------------------------------------------------- internals
    def _new_entry(self, sequence_id: str, now: float) -> _Entry:
        e = _Entry(next(self._keys), sequence_id, np.zeros(0, dtype=np.int64), 0, None, 0, now)
        self._entries[e.key] = e
        if sequence_id:
            self._by_sequence[sequence_id] = e
        return e

    def _transient(self, n: int, src: _Entry | None, start: int) -> Lease:
        self._transient_rows += 1
        buf = self.geometry.allocate(n)
        if start and src is not None and src.buf is not None:
            buf[:, :, :, :start] = src.buf[:, :, :, :start]
            self._copied += start
        return Lease(buf, start, None)

    def _make_room(self, nbytes: int, protect: set[int], now: float) -> bool:
        """Evict idle entries (least recently used first) until ``nbytes`` more fit."""
        if self._bytes + nbytes <= self.max_bytes:
            return True
        for key in list(self._entries):
            e = self._entries[key]
            if key in protect or self._running(e, now):
                continue
            self._remove(e)
            self._evictions += 1
            if self._bytes + nbytes <= self.max_bytes:
                return True
        return False

    def _evict_extra_entries(self, now: float) -> None:
        # The entry count bounds the prefix scan; only idle entries go.
        for key in list(self._entries):
            if len(self._entries) <= self.max_entries:
                return
            e = self._entries[key]
            if not self._running(e, now):
                self._remove(e)
                self._evictions += 1

    def _drop_dominated(self, e: _Entry) -> None:
        """An anonymous entry adds nothing where another holds a longer run of the same tokens;
        anonymous entries it covers go."""
        toks = e.tokens[: e.length]
        for other in list(self._entries.values()):
            if other is e or other.busy or not other.length or other.namespace != e.namespace:
                continue
            m = _lcp(other.tokens[: other.length], toks)
            if m == e.length and other.length >= e.length:
                self._remove(e)
                return
            if m == other.length and not other.sequence_id:
                self._remove(other)

    def _remove(self, e: _Entry) -> None:
        self._entries.pop(e.key, None)
        self._bytes -= e.capacity * self.bytes_per_token
        e.capacity, e.buf = 0, None
        if e.sequence_id and self._by_sequence.get(e.sequence_id) is e:
            del self._by_sequence[e.sequence_id]

    # ------------------------------------------------------------------- admin
    def running_sequences(self) -> int:
        now = self._clock()
        with self._lock:
            return sum(1 for e in self._entries.values() if self._running(e, now))

    def clear(self) -> None:
        with self._lock:
            for e in list(self._entries.values()):
                if not e.busy:
                    self._remove(e)

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
                transient=self._transient_rows,
                copied_tokens=self._copied,
            )

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


def _lcp(a: np.ndarray, b: np.ndarray) -> int:
    m = min(a.shape[0], b.shape[0])
    if m == 0 or a[0] != b[0]:
        return 0
    neq = np.flatnonzero(a[:m] != b[:m])
    return int(neq[0]) if neq.size else m
