"""Per-row attention over per-sequence KV buffers: a batched forward that copies no past.

Owns the transformers plumbing that lets one padded forward pass (all rows share the MLPs and
projections, so batching still pays) attend, row by row, straight into each sequence's own KV
buffer: ``RowKVCache.update`` writes a row's *new* keys/values in place into its buffer
(``[layers, 2, kv_heads, capacity, head_dim]``, see ``sequence_kv``), and the registered attention
function ``eft_rows`` runs ``scaled_dot_product_attention`` per row on a view of that buffer's
first ``start + new`` positions. Nothing is gathered into a padded ``[B, H, P, D]`` past and no
``torch.cat`` re-copies the past: a decode step moves O(new tokens) of KV, not O(prefix).

Sliding-window layers (Mistral, Gemma-2's alternate layers) attend to their window of the buffer
(the kernel records which window each layer applied, for the engine's probe); Gemma-2's attention
soft-capping is computed as its eager attention computes it. Without a row context (an ordinary
forward) ``eft_rows`` is exactly transformers' ``sdpa`` attention and mask, and ``eft_rows_eager``
the model's own eager attention, so the model behaves as loaded. ``enable_row_attention`` switches a
model on ``sdpa`` (the transformers default), or on ``eager`` because its class cannot run sdpa;
the engine's load-time probe (``HFEngine._enable_rows``) checks that the row path reproduces the
plain forward and falls back to gathering the past otherwise. Does NOT know: which sequences
exist, budgets, eviction, or what the logits mean.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (the usual alias)
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

__all__ = [
    "ROW_ATTENTION",
    "ROW_ATTENTION_EAGER",
    "RowSlots",
    "RowKVCache",
    "enable_row_attention",
    "row_forward_kwargs",
]

ROW_ATTENTION = "eft_rows"
ROW_ATTENTION_EAGER = "eft_rows_eager"
_ROWS_KW = "eft_row_slots"


@dataclass
class RowSlots:
    """One batched forward's rows: row ``i`` writes its ``lens[i]`` new positions at
    ``starts[i]`` of ``buffers[i]`` and attends to positions ``[0, starts[i] + lens[i])``."""

    buffers: Sequence[torch.Tensor]  # each [layers, 2, kv_heads, capacity, head_dim]
    starts: Sequence[int]
    lens: Sequence[int]
    # Filled by the kernel: the sliding window each layer applied (None: full attention). The
    # engine's load-time probe checks it against the model's sliding layers.
    windows: dict[int, int | None] = field(default_factory=dict)


class RowKVCache(DynamicCache):
    """A transformers ``Cache`` whose ``update`` writes into the rows' own buffers.

    It returns the new keys/values unchanged: ``eft_rows`` reads the past from the buffers, so
    nothing concatenates the past with the new positions.
    """

    def __init__(self, slots: RowSlots) -> None:
        super().__init__()
        self.slots = slots

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.slots
        for i, (buf, c, n) in enumerate(zip(s.buffers, s.starts, s.lens)):
            buf[layer_idx, 0, :, c : c + n] = key_states[i, :, :n]
            buf[layer_idx, 1, :, c : c + n] = value_states[i, :, :n]
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max((c for c in self.slots.starts), default=0)


def _row_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    slots: RowSlots | None = kwargs.pop(_ROWS_KW, None)
    if slots is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    return _attend_rows(module, query, slots, scaling, kwargs), None


def _row_attention_eager(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``eft_rows_eager``: for models that run transformers' eager attention (Gemma-2: sdpa cannot
    soft-cap). Without a row context it is the model's own eager function, on eager's masks."""
    slots: RowSlots | None = kwargs.pop(_ROWS_KW, None)
    if slots is None:
        eager = sys.modules[type(module).__module__].eager_attention_forward
        out: tuple[torch.Tensor, torch.Tensor | None] = eager(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        return out
    return _attend_rows(module, query, slots, scaling, kwargs), None


def _attend_rows(
    module: torch.nn.Module, query: torch.Tensor, slots: RowSlots, scaling: float | None, kwargs: dict[str, Any]
) -> torch.Tensor:
    layer = int(module.layer_idx)  # type: ignore[arg-type]  # an int attribute of attention modules
    # Sliding-window layers (Mistral, Gemma-2, Qwen2 with use_sliding_window) name their window;
    # as in transformers' masks, query position q sees keys q - window < t <= q.
    window = kwargs.get("sliding_window")
    window = int(window) if window else None
    slots.windows[layer] = window
    softcap = kwargs.get("softcap")  # Gemma-2's attention logit soft-capping
    b, hq, q_len, d = query.shape
    # transformers' attention functions return [batch, q_len, heads, head_dim].
    out = query.new_zeros((b, q_len, hq, d))
    for i, (buf, c, n) in enumerate(zip(slots.buffers, slots.starts, slots.lens)):
        total = c + n
        lo = max(0, c + 1 - window) if window else 0  # the first key any of the row's queries sees
        k = buf[layer, 0, :, lo:total].unsqueeze(0)
        v = buf[layer, 1, :, lo:total].unsqueeze(0)
        q = query[i : i + 1, :, :n]
        mask = None
        if n > 1:
            # Query j (absolute position c + j) sees keys up to c + j: bottom-right aligned causality.
            qpos = torch.arange(c, total, device=query.device)[:, None]
            kpos = torch.arange(lo, total, device=query.device)[None, :]
            mask = kpos <= qpos
            if window:
                mask &= kpos > qpos - window
        if softcap is None:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=k.shape[1] != hq)
        else:
            o = _capped_attention(q, k, v, mask, scaling if scaling is not None else d**-0.5, float(softcap))
        out[i, :n] = o[0].transpose(0, 1)
    return out


def _capped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scaling: float, softcap: float
) -> torch.Tensor:
    """Attention with soft-capped scores, ``softcap * tanh(s / softcap)``, as transformers' eager
    Gemma-2 computes it (fp32 softmax)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v)


def _register() -> None:
    AttentionInterface.register(ROW_ATTENTION, _row_attention)
    AttentionMaskInterface.register(ROW_ATTENTION, sdpa_mask)
    AttentionInterface.register(ROW_ATTENTION_EAGER, _row_attention_eager)
    AttentionMaskInterface.register(ROW_ATTENTION_EAGER, eager_mask)


def enable_row_attention(model: Any) -> bool:
    """Switch ``model`` to the row kernel: ``eft_rows`` from ``sdpa``, ``eft_rows_eager`` from
    ``eager`` (each the same as the model's own without a row context). ``eager`` only for model
    classes that cannot run sdpa (Gemma-2: soft-capping); a model put on eager by choice stays off
    the row kernel (the engine gathers the past through its eager attention). False also if the
    model runs another kernel (flash, ...) or refuses the switch."""
    current = getattr(model.config, "_attn_implementation", None)
    if current in ("sdpa", ROW_ATTENTION):
        target = ROW_ATTENTION
    elif (
        current in ("eager", ROW_ATTENTION_EAGER)
        and not getattr(model, "_supports_sdpa", True)
        and _has_module_eager(model)
    ):
        target = ROW_ATTENTION_EAGER
    else:
        return False
    _register()
    try:
        model.set_attn_implementation(target)
    except Exception:  # noqa: BLE001  # a model that cannot take a custom kernel keeps its own
        return False
    return getattr(model.config, "_attn_implementation", None) == target


def _has_module_eager(model: Any) -> bool:
    """Every attention module's modeling file defines ``eager_attention_forward`` (what eager runs)."""
    found = False
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "scaling"):
            if not callable(getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)):
                return False
            found = True
    return found


def row_forward_kwargs(slots: RowSlots, batch: int, device: torch.device) -> dict[str, Any]:
    """The model kwargs of a row forward: our cache, the row context, and a 4-D placeholder mask
    (transformers passes a 4-D mask through untouched; ``eft_rows`` builds each row's own)."""
    return {
        "cache": RowKVCache(slots),
        _ROWS_KW: slots,
        "attention_mask": torch.ones((batch, 1, 1, 1), dtype=torch.bool, device=device),
    }
