"""Which KV layout a transformers model can run, decided once at load.

Owns the load-time facts the HF engine's layouts rest on: whether every layer's attention reads
plain past keys/values (full or sliding-window layers: ``kv_reuse_supported``), each layer's
sliding window, the KV geometry from a one-token probe, and the probe that switches a model to the
per-row attention kernel (``row_attention``) only when it reproduces the model's own forward —
past the shortest sliding window, with each layer's window checked. Does NOT know batching, KV
budgets or the engine's calls.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from eft_serve.engine.kv_cache import kv_layers_from_cache
from eft_serve.engine.row_attention import RowSlots, enable_row_attention, row_forward_kwargs
from eft_serve.engine.sequence_kv import KVGeometry

__all__ = ["WINDOW_PROBE_MAX", "enable_rows_if_exact", "kv_geometry", "kv_reuse_supported", "sliding_windows"]

log = logging.getLogger("eft_serve.engine.hf_engine")


def kv_reuse_supported(model: Any) -> bool:
    """Prefix reuse needs every layer's attention to read plain keys/values of past positions:
    full layers, or sliding-window ones (the engine keeps their whole KV in its own buffers and
    the window is a mask: the model's own in ``gather``, ``row_attention``'s in ``rows``). Not
    chunked, linear-attention or quantized layers."""
    try:
        probe = DynamicCache(config=model.config)
    except Exception:  # noqa: BLE001  # pragma: no cover - exotic configs: no prefix reuse, not a failure
        return False
    return all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in probe.layers)


# The row kernel's load-time probe runs past a sliding window up to this long (a longer one is
# checked by which window each layer applies, not numerically: the probe would cost too much).
WINDOW_PROBE_MAX = 64


def sliding_windows(model: Any) -> list[int | None]:
    """Each layer's sliding window (None: full attention), as the model's own cache sees them."""
    try:
        probe = DynamicCache(config=model.config)
    except Exception:  # noqa: BLE001  # pragma: no cover - exotic configs: checked by kv_reuse_supported
        return []
    return [
        int(layer.sliding_window) if isinstance(layer, DynamicSlidingWindowLayer) else None for layer in probe.layers
    ]


def kv_geometry(model: Any, max_positions: int) -> KVGeometry | None:
    """KV shape from a 1-token probe; None when layers differ (no per-sequence buffers then)."""
    dev = next(model.parameters()).device
    with torch.inference_mode():
        out = model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=dev), use_cache=True)
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    try:
        layers = kv_layers_from_cache(cache)
    except (TypeError, ValueError):
        return None
    shapes = {(k.shape[1], k.shape[3], v.shape[1], v.shape[3], k.dtype) for k, v in layers}
    if len(shapes) != 1:
        return None
    heads, dim, v_heads, v_dim, dtype = shapes.pop()
    if (heads, dim) != (v_heads, v_dim):
        return None
    return KVGeometry(len(layers), int(heads), int(dim), dtype, dev, int(max_positions))


def enable_rows_if_exact(model: Any, geometry: KVGeometry, input_vocab: int, max_context: int, name: str) -> bool:
    """Switch ``model`` to the row kernel if, on a probe, it reproduces the model's own forward; else undo.

    The probe runs past the shortest sliding window when that is short (else the window's
    mask is checked only by which window each layer's kernel applied, against the model's
    sliding layers)."""
    windows = sliding_windows(model)
    shortest = min((w for w in windows if w), default=None)
    n = min(max(8, shortest + 4 if shortest and shortest <= WINDOW_PROBE_MAX else 8), max_context)
    device = next(model.parameters()).device
    toks = (torch.arange(n, device=device) * 7919) % input_vocab
    with torch.inference_mode():
        plain = model(input_ids=toks[None]).logits[0].float()  # the model's own kernel
    original = str(getattr(model.config, "_attn_implementation", "sdpa"))
    if not enable_row_attention(model):
        return False
    buf = geometry.allocate(n)
    first = max(1, n - 3)
    slots = [RowSlots([buf], [0], [first]), RowSlots([buf], [first], [n - first])]
    try:
        with torch.inference_mode():
            parts = [
                model(
                    input_ids=toks[None, s.starts[0] : s.starts[0] + s.lens[0]],
                    position_ids=torch.arange(s.starts[0], s.starts[0] + s.lens[0], device=device)[None],
                    use_cache=True,
                    **row_forward_kwargs(s, 1, device),
                ).logits[0]
                for s in slots
            ]
        rows = torch.cat(parts).float()
        tol = 1e-3 if geometry.dtype == torch.float32 else 5e-2
        close = torch.allclose(rows, plain, rtol=tol, atol=tol * max(1.0, float(plain.abs().max())))
        applied = all([s.windows.get(i) for i in range(len(windows))] == windows for s in slots)
    except Exception:  # a model whose attention the row kernel cannot take: gather instead
        log.warning("%s: the per-row attention kernel failed its probe", name, exc_info=True)
        close = applied = False
    if close and applied:
        return True
    log.warning(
        "%s: the per-row attention kernel disagrees with the model's own (%s); gathering the past",
        name,
        "logits" if not close else f"sliding windows: model {windows}, kernel {slots[0].windows}",
    )
    model.set_attn_implementation(original)
    return False
