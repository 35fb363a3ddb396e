"""KV conversions: transformers caches <-> per-layer tensors, and fresh cache objects per call."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from eft_serve.engine.kv_cache import cache_from_kv_layers, kv_layers_from_cache

LAYERS, HEADS, DIM = 2, 2, 4


def make_kv(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(
        (torch.randn(1, HEADS, n, DIM, generator=g), torch.randn(1, HEADS, n, DIM, generator=g)) for _ in range(LAYERS)
    )


def test_conversions_roundtrip():
    kv = make_kv(3)
    back = kv_layers_from_cache(cache_from_kv_layers(kv))
    assert len(back) == LAYERS and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(kv, back))
    assert kv_layers_from_cache([list(layer) for layer in kv])[1][1] is kv[1][1]  # a legacy tuple cache
    with pytest.raises(TypeError, match="unsupported cache type"):
        kv_layers_from_cache(object())


def test_each_cache_object_is_fresh_and_leaves_the_layers_intact():
    kv = make_kv(4)
    a, b = cache_from_kv_layers(kv), cache_from_kv_layers(kv)
    assert a is not b and isinstance(a, DynamicCache)
    # Append a position as a forward pass would: the other cache and the layers are untouched.
    a.update(torch.ones(1, HEADS, 1, DIM), torch.ones(1, HEADS, 1, DIM), 0)
    assert a.get_seq_length() == 5 and b.get_seq_length() == 4
    assert kv[0][0].shape[-2] == 4 and torch.equal(kv_layers_from_cache(b)[0][0], kv[0][0])
