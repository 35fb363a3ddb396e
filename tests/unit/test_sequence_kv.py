"""SequenceKVStore: admission pins running sequences, eviction takes only idle ones, decode steps
write in place (no copy of the past), the byte budget holds, and the KV budget rule."""

from __future__ import annotations

import numpy as np
import torch

from eft_serve.engine.kv_budget import auto_kv_cache_bytes
from eft_serve.engine.sequence_kv import KVGeometry, SequenceKVStore

GEO = KVGeometry(layers=1, kv_heads=1, head_dim=2, dtype=torch.float32, device=torch.device("cpu"), max_positions=64)
BPT = GEO.bytes_per_token  # 16 bytes a position


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def toks(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50, size=n).astype(np.int64)


def step(store: SequenceKVStore, sid: str, tokens: np.ndarray) -> int:
    """One engine step without a model: acquire, 'write' the new positions, commit."""
    lease = store.acquire(sid, tokens, len(tokens) - 1)
    lease.buf[:, :, :, lease.start : len(tokens)] = 1.0
    store.commit(lease, tokens)
    return lease.start


def test_running_sequences_are_not_evicted_idle_ones_are() -> None:
    clock = Clock()
    store = SequenceKVStore(1700, GEO, clock=clock)  # two 30-token sequences (48-position buffers)
    a, b, c = toks(1, 30), toks(2, 30), toks(3, 30)
    assert store.admit([("a", 30), ("b", 30)]).ok
    step(store, "a", a)
    step(store, "b", b)
    verdict = store.admit([("c", 30)])
    assert not verdict.ok and verdict.blocked == 1 and verdict.running == 2
    # Called anyway (no admission): c runs in a transient buffer; a and b keep their KV.
    assert step(store, "c", c) == 0
    s = store.stats()
    assert s.transient == 1 and s.evictions == 0 and s.bytes <= store.max_bytes
    assert step(store, "a", np.append(a, 7)) == 30 and step(store, "b", np.append(b, 7)) == 30
    # Once a and b are idle (past their first-call window) c is admitted and evicts the LRU one.
    clock.now += 11
    assert store.admit([("c", 30)]).ok
    step(store, "c", c)
    s = store.stats()
    assert s.evictions == 1 and s.bytes <= store.max_bytes
    assert step(store, "a", np.append(a, [7, 8])) == 0  # a went (least recently used)
    assert store.running_sequences() == 1  # c; a was re-acquired without admission: not pinned


def test_idle_window_follows_the_sequences_pace() -> None:
    clock = Clock()
    store = SequenceKVStore(10_000, GEO, clock=clock)
    t = toks(4, 10)
    for i in range(5):  # a stream stepping every 0.2 s: window = max(1 s, 4 × 0.2 s)
        assert store.admit([("s", 10 + i)]).ok
        step(store, "s", np.append(t, np.arange(i, dtype=np.int64)))
        clock.now += 0.2
    assert store.running_sequences() == 1
    clock.now += 0.9
    assert store.running_sequences() == 0


def test_growth_may_use_the_reserve_new_sequences_may_not() -> None:
    clock = Clock()
    store = SequenceKVStore(100 * BPT, GEO, clock=clock)
    assert store.admit([("a", 60)]).ok
    step(store, "a", toks(5, 60))  # 60 + headroom, capped at max_positions: 64 positions held
    assert not store.admit([("b", 30)]).ok  # 64 + 30 > 90 % of 100
    assert store.admit([("a", 64)]).ok  # within its own buffer
    assert store.admit([("b", 26)]).ok  # 64 + 26 = 90: fits the new-sequence share exactly


def test_decode_steps_write_in_place_and_copy_nothing() -> None:
    store = SequenceKVStore(10_000, GEO)
    t = toks(6, 12)
    assert step(store, "s", t) == 0
    lease = store.acquire("s", np.append(t, 3), 12)
    ptr = lease.buf.data_ptr()
    store.commit(lease, np.append(t, 3))
    copied = store.stats().copied_tokens
    seq = np.append(t, 3)
    for i in range(3):
        seq = np.append(seq, i)
        lease = store.acquire("s", seq, len(seq) - 1)
        assert lease.start == len(seq) - 1 and lease.buf.data_ptr() == ptr
        store.commit(lease, seq)
    assert store.stats().copied_tokens == copied == 0
    # Another sequence sharing the head copies it once, into its own buffer.
    other = np.append(t[:8], [40, 41])
    lease = store.acquire("o", other, len(other) - 1)
    assert lease.start == 8 and lease.buf.data_ptr() != ptr
    store.commit(lease, other)
    assert store.stats().copied_tokens == 8


def test_budget_rule() -> None:
    cpu = torch.device("cpu")
    assert auto_kv_cache_bytes(cpu, 1 << 30, memory_bytes=5 << 30) == 2 << 30
    assert auto_kv_cache_bytes(cpu, 6 << 30, memory_bytes=5 << 30) == 0
    assert auto_kv_cache_bytes(cpu, 1 << 30) > 0  # a fifth of what is available now
