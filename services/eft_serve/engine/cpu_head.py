"""The output head (``lm_head``) on CPU for decode-sized batches: same weights, a faster kernel.

Owns one workaround of a slow CPU kernel. A decode step feeds one position per row, so the head
multiplies a few rows ``x`` (``[M, d]``) by the ``[V, d]`` vocabulary matrix, and on CPU that
matrix is most of the bytes a step reads (GPT-2: 50,257 × 768 floats = 154 MB, a third of the
12-layer model). ``F.linear(x, W)`` (``x @ Wᵀ``) takes MKL's slowest path there, two to three
times slower than ``(W @ xᵀ)ᵀ`` at 2-4 rows (docs/benchmarks.md#why-the-engines-work-this-way).

``W @ xᵀ`` with two or more columns streams ``W`` once at memory speed; with one column it falls
back to the slow matrix-vector path, so a single row is fed twice (the second copy's answer is
dropped). ``CpuDecodeHead`` picks that kernel for at most ``FEW_ROWS`` rows and ``F.linear``
otherwise (prefills), keeps the very same weight ``Parameter`` (tied embeddings stay tied, the
state dict keeps its names) and changes each logit only by float summation order (~1e-6).

Installed only for float32 ``nn.Linear`` heads on CPU; GPUs (cuBLAS) are left alone.
Does NOT know: KV, batching policy, logprobs — it returns the same logits tensor shape.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (the usual alias)

__all__ = ["FEW_ROWS", "CpuDecodeHead", "enable_cpu_decode_head"]

# Up to this many rows the transposed product is at least as fast at both model widths timed
# (d = 768: within noise at 8 rows; d = 256: faster).
FEW_ROWS = 8


class CpuDecodeHead(torch.nn.Module):
    """Drop-in for a CPU ``nn.Linear`` output head (same ``weight`` / ``bias`` parameters)."""

    def __init__(self, head: torch.nn.Linear) -> None:
        super().__init__()
        self.weight = head.weight
        self.bias = head.bias
        self.in_features = head.in_features
        self.out_features = head.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        n = rows.shape[0]
        if n == 0 or n > FEW_ROWS:
            return F.linear(x, self.weight, self.bias)
        cols = rows.t() if n > 1 else torch.cat([rows, rows]).t()
        out = torch.mm(self.weight, cols).t()[:n]
        if self.bias is not None:
            out = out + self.bias
        # Contiguous [.., V] like F.linear's answer (log_softmax and slicing downstream expect it).
        return out.contiguous().reshape(*x.shape[:-1], self.out_features)


def enable_cpu_decode_head(model: Any) -> bool:
    """Swap ``model``'s output head for ``CpuDecodeHead`` when it is a float32 ``nn.Linear`` on
    CPU; True when swapped (or already)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if isinstance(head, CpuDecodeHead):
        return True
    if type(head) is not torch.nn.Linear:
        return False
    if head.weight.device.type != "cpu" or head.weight.dtype != torch.float32:
        return False
    model.set_output_embeddings(CpuDecodeHead(head))
    return True
