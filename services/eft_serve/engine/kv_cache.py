"""Attention KV as plain per-layer tensors: conversions to and from transformers caches, and KV counters.

Owns the conversions between a transformers cache object and the per-layer ``(keys, values)``
tensors the engine keeps per sequence (`sequence_kv`), and ``KVCacheStats``, the counters every KV
store reports. Does NOT know models, forward passes, batching, or what the tokens mean.

Safety rule: the tensors of ``KVLayers`` are never mutated in place (transformers'
``DynamicLayer.update`` rebinds via ``torch.cat``), and ``cache_from_kv_layers`` builds a fresh cache
object each time, so two forward passes never share a mutable cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

__all__ = ["KVCacheStats", "KVLayers", "cache_from_kv_layers", "kv_layers_from_cache"]

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
