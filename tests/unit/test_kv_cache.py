"""PrefixKVCache: prefix matching, byte bound, LRU order, isolation of handed-out caches, threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from eft_serve.engine.kv_cache import (
    PrefixKVCache,
    cache_from_kv_layers,
    kv_layers_from_cache,
    kv_nbytes,
)

LAYERS, HEADS, DIM = 2, 2, 4
PER_TOKEN = LAYERS * 2 * HEADS * DIM * 4  # float32 bytes of one position


def make_kv(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(
        (torch.randn(1, HEADS, n, DIM, generator=g), torch.randn(1, HEADS, n, DIM, generator=g)) for _ in range(LAYERS)
    )


def test_longest_prefix_and_cap():
    c = PrefixKVCache(1 << 20)
    kv = make_kv(6)
    assert c.store([1, 2, 3, 4, 5, 6], kv)
    n, layers = c.lookup_layers([1, 2, 3, 9, 9])
    assert n == 3
    assert layers[0][0].shape == (1, HEADS, 3, DIM)
    assert torch.equal(layers[1][1], kv[1][1][..., :3, :])
    # The cap: the caller needs to recompute at least the tail.
    n, _ = c.lookup_layers([1, 2, 3, 4, 5, 6], max_len=5)
    assert n == 5
    n, layers = c.lookup_layers([7, 8])
    assert (n, layers) == (0, None)
    s = c.stats()
    assert (s.hits, s.misses, s.hit_tokens) == (2, 1, 8)


def test_lookup_returns_fresh_cache_objects():
    c = PrefixKVCache(1 << 20)
    kv = make_kv(5)
    c.store(range(5), DynamicCache(ddp_cache_data=kv))
    n1, a = c.lookup(range(5), max_len=4)
    n2, b = c.lookup(range(5), max_len=4)
    assert n1 == n2 == 4 and a is not b
    # Mutate one as a forward pass would (append a position): the other and the store are intact.
    a.update(torch.ones(1, HEADS, 1, DIM), torch.ones(1, HEADS, 1, DIM), 0)
    assert a.get_seq_length() == 5 and b.get_seq_length() == 4
    n3, again = c.lookup_layers(range(5))
    assert n3 == 5 and torch.equal(again[0][0], kv[0][0])


def test_store_cuts_extra_positions_and_compacts_views():
    c = PrefixKVCache(1 << 20)
    big = make_kv(10)
    view = tuple((k[..., :4, :], v[..., :4, :]) for k, v in big)
    assert c.store([5, 6, 7, 8], view)
    assert c.stats().bytes == 4 * PER_TOKEN
    _, layers = c.lookup_layers([5, 6, 7, 8])
    # Stored tensors are compact copies, not views pinning the 10-position storage.
    assert layers[0][0].untyped_storage().nbytes() == layers[0][0].nbytes
    with pytest.raises(ValueError):
        c.store(range(20), big)  # more tokens than positions


def test_sequence_id_replaces_and_prefixes_are_superseded():
    c = PrefixKVCache(1 << 20)
    c.store([1, 2, 3], make_kv(3), sequence_id="a")
    c.store([1, 2, 3, 4, 5], make_kv(5), sequence_id="a")
    assert len(c) == 1  # the shorter entry is a prefix of the longer
    # A rejected speculative block: the sequence diverges; its old entry is replaced.
    c.store([1, 2, 3, 9], make_kv(4, seed=1), sequence_id="a")
    assert len(c) == 1
    n, _ = c.lookup_layers([1, 2, 3, 4, 5], sequence_id="a")
    assert n == 3
    # Already covered by a longer entry: not duplicated.
    c.store([1, 2], make_kv(2))
    assert len(c) == 1
    # Another sequence finds the entry by prefix alone.
    n, _ = c.lookup_layers([1, 2, 3, 9, 0], sequence_id="other")
    assert n == 4


def test_byte_bound_and_lru_eviction():
    c = PrefixKVCache(3 * 4 * PER_TOKEN)  # room for three 4-token entries
    for i in range(3):
        assert c.store([100 + i, 1, 2, 3], make_kv(4, seed=i))
    assert c.stats().bytes == 3 * 4 * PER_TOKEN
    c.lookup_layers([100, 1, 2, 3])  # refresh entry 0: entry 1 is now least recently used
    assert c.store([200, 1, 2, 3], make_kv(4))
    s = c.stats()
    assert s.evictions == 1 and s.entries == 3 and s.bytes <= c.max_bytes
    assert c.lookup_layers([101, 1, 2, 3])[0] == 0
    assert c.lookup_layers([100, 1, 2, 3])[0] == 4
    # An entry larger than the whole budget is refused and evicts nothing.
    assert not c.store(range(1000, 1013), make_kv(13))
    s = c.stats()
    assert s.oversize == 1 and s.entries == 3


def test_disabled_cache_and_max_entries():
    off = PrefixKVCache(0)
    assert not off.store([1], make_kv(1))
    assert off.lookup([1]) == (0, None)
    c = PrefixKVCache(1 << 20, max_entries=2)
    for i in range(5):
        c.store([i, 50], make_kv(2))
    assert len(c) == 2 and c.stats().evictions == 3


def test_conversions_roundtrip():
    kv = make_kv(3)
    cache = cache_from_kv_layers(kv)
    back = kv_layers_from_cache(cache)
    assert len(back) == LAYERS and all(torch.equal(a[0], b[0]) for a, b in zip(kv, back))
    assert kv_nbytes(kv) == 3 * PER_TOKEN


def test_thread_safety_keeps_accounting_exact():
    c = PrefixKVCache(40 * PER_TOKEN)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(200):
                n = int(rng.integers(1, 8))
                toks = rng.integers(0, 4, size=n).tolist()
                if rng.random() < 0.5:
                    c.store(toks, make_kv(n), sequence_id=f"s{rng.integers(0, 5)}")
                else:
                    got, layers = c.lookup_layers(toks, max_len=n)
                    assert got <= n
                    if layers is not None:
                        assert layers[0][0].shape[-2] == got
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    s = c.stats()
    assert s.bytes <= c.max_bytes
    assert s.bytes == sum(e.nbytes for e in c._entries.values())
