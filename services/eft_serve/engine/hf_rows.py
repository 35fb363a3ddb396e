"""The rows of one HF engine call: what each sequence feeds, and how rows share forward passes.

Owns the per-row record (its prefix, the cached length its KV lease covers, the positions whose
logits are wanted, its LoRA adapter), the grouping of rows into padded forward passes within the
batch bounds, and the engine's work counters. Does NOT run models or touch KV buffers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from eft_serve.engine.sequence_kv import Lease

__all__ = ["CallRow", "EngineCounters", "plan_forward_groups"]


@dataclass
class EngineCounters:
    """Cumulative work counters (observability; tests use them to see batching happen)."""

    forward_passes: int = 0
    rows: int = 0
    # New tokens fed to the model, and the padded positions actually computed (B * L).
    new_tokens: int = 0
    padded_tokens: int = 0
    cached_tokens: int = 0
    # Past positions copied into a padded batch (the gather layout only; the row layout copies none).
    gathered_tokens: int = 0


@dataclass
class CallRow:
    tokens: np.ndarray  # int64, the whole prefix
    cached_len: int  # positions whose KV the lease already holds
    num_logits: int  # trailing positions whose next-token distribution is wanted
    lease: Lease | None  # None: no KV kept (plain forward of the whole prefix)
    committed: bool = False  # the forward wrote and committed the lease (else released on failure)
    adapter: str = ""  # the co-located LoRA adapter this row runs ("" = the plain model)

    @property
    def new_len(self) -> int:
        return int(self.tokens.shape[0]) - self.cached_len


def plan_forward_groups(
    rows: Sequence[CallRow], max_batch_size: int, max_batch_tokens: int, padded_past: bool
) -> list[list[int]]:
    """Group rows into forward passes: similar new lengths, bounded padded size.

    Sorted by new length, a row joins the current group while the padded batch
    ``B * (P + L)`` stays within ``max_batch_tokens`` and the longest new segment is at most
    ``max(2 * shortest, shortest + 16)`` (bounds padding waste). A single oversized row still
    runs, alone. ``padded_past`` False (the row layout materialises none): ``P`` counts as 0.
    """
    order = sorted(range(len(rows)), key=lambda i: (rows[i].new_len, rows[i].cached_len))
    groups: list[list[int]] = []
    cur: list[int] = []
    min_l = max_l = max_p = 0
    for i in order:
        n_new, c = rows[i].new_len, (rows[i].cached_len if padded_past else 0)
        if cur:
            b2, p2, l2 = len(cur) + 1, max(max_p, c), max(max_l, n_new)
            if b2 <= max_batch_size and b2 * (p2 + l2) <= max_batch_tokens and l2 <= max(2 * min_l, min_l + 16):
                cur.append(i)
                max_p, max_l = p2, l2
                continue
            groups.append(cur)
        cur, min_l, max_l, max_p = [i], n_new, n_new, c
    if cur:
        groups.append(cur)
    return groups
