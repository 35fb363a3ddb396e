"""Per-row attention over per-sequence KV buffers: a batched forward that copies no past.

Owns the transformers plumbing that lets one padded forward pass (all rows share the MLPs and
projections, so batching still pays) attend, row by row, straight into each sequence's own KV
buffer: ``RowKVCache.update`` writes a row's *new* keys/values in place into its buffer
(``[layers, 2, kv_heads, capacity, head_dim]``, see ``sequence_kv``), and the registered attention
function ``eft_rows`` runs ``scaled_dot_product_attention`` per row on a view of that buffer's
first ``start + new`` positions. Nothing is gathered into a padded ``[B, H, P, D]`` past and no
``torch.cat`` re-copies the past: a decode step moves O(new tokens) of KV, not O(prefix).

Without a row context (an ordinary forward) ``eft_rows`` is exactly transformers' ``sdpa``
attention and mask, so the model behaves as loaded. ``enable_row_attention`` switches a model to it
only when it uses ``sdpa`` (the transformers default), and ``row_attention_matches`` checks on a
probe that the row path reproduces the plain forward; the engine falls back to gathering the past
otherwise. Does NOT know: which sequences exist, budgets, eviction, or what the logits mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (the usual alias)
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

__all__ = ["ROW_ATTENTION", "RowSlots", "RowKVCache", "enable_row_attention", "row_forward_kwargs"]

ROW_ATTENTION = "eft_rows"
_ROWS_KW = "eft_row_slots"


@dataclass
class RowSlots:
    """One batched forward's rows: row ``i`` writes its ``lens[i]`` new positions at
    ``starts[i]`` of ``buffers[i]`` and attends to positions ``[0, starts[i] + lens[i])``."""

    buffers: Sequence[torch.Tensor]  # each [layers, 2, kv_heads, capacity, head_dim]
    starts: Sequence[int]
    lens: Sequence[int]


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
    layer = int(module.layer_idx)  # type: ignore[arg-type]  # an int attribute of attention modules
    b, hq, q_len, d = query.shape
    # transformers' attention functions return [batch, q_len, heads, head_dim].
    out = query.new_zeros((b, q_len, hq, d))
    for i, (buf, c, n) in enumerate(zip(slots.buffers, slots.starts, slots.lens)):
        total = c + n
        k = buf[layer, 0, :, :total].unsqueeze(0)
        v = buf[layer, 1, :, :total].unsqueeze(0)
        q = query[i : i + 1, :, :n]
        mask = None
        if n > 1:
            # Query j (absolute position c + j) sees keys 0..c + j: bottom-right aligned causality.
            mask = torch.ones((n, total), dtype=torch.bool, device=query.device).tril(diagonal=c)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=k.shape[1] != hq)
        out[i, :n] = o[0].transpose(0, 1)
    return out, None


def _register() -> None:
    AttentionInterface.register(ROW_ATTENTION, _row_attention)
    AttentionMaskInterface.register(ROW_ATTENTION, sdpa_mask)


def enable_row_attention(model: Any) -> bool:
    """Switch ``model`` to ``eft_rows`` (same as ``sdpa`` without a row context); False if the
    model does not use ``sdpa`` (another kernel was asked for) or refuses the switch."""
    config = model.config
    if getattr(config, "_attn_implementation", None) not in ("sdpa", ROW_ATTENTION):
        return False
    _register()
    try:
        model.set_attn_implementation(ROW_ATTENTION)
    except Exception:  # noqa: BLE001  # a model that cannot take a custom kernel keeps its own
        return False
    return getattr(model.config, "_attn_implementation", None) == ROW_ATTENTION


def row_forward_kwargs(slots: RowSlots, batch: int, device: torch.device) -> dict[str, Any]:
    """The model kwargs of a row forward: our cache, the row context, and a 4-D placeholder mask
    (transformers passes a 4-D mask through untouched; ``eft_rows`` builds each row's own)."""
    return {
        "cache": RowKVCache(slots),
        _ROWS_KW: slots,
        "attention_mask": torch.ones((batch, 1, 1, 1), dtype=torch.bool, device=device),
    }
