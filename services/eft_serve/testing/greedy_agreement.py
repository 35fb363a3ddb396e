"""Greedy tokens from the service against `ReferenceEFT`, where only a near tie may differ.

Owns the comparison rule the engine-agreement tests share: walk the two greedy sequences; at the
first difference, the reference's exact merged scores at that position must have a top-2 gap of
at most `noise` (which of two near-tied tokens wins is float rounding, not a bug), and the
comparison of that sequence ends there. Test-only (it lives in `eft_serve.testing`).
Does NOT know how the tokens were produced.
"""

from __future__ import annotations

import numpy as np
import torch

from eft_serve.reference import ReferenceEFT


def merged_scores(reference: ReferenceEFT, ids: list[int]) -> np.ndarray:
    """The recipe's unnormalised merged scores of the token after `ids` (float64, over the
    reference's support: the full vocabulary, or the tokenizer's ids of padded heads)."""
    with torch.inference_mode():
        score = None
        for role, coef in reference.coefficients.items():
            logits = reference.models[role](torch.tensor([ids])).logits[0, -1, : reference.support]
            lp = torch.log_softmax(logits.double(), -1)
            score = coef * lp if score is None else score + coef * lp
    assert score is not None
    return score.numpy()


def agreed_tokens(
    got: list[int], expected: list[int], reference: ReferenceEFT, prompt_ids: list[int], noise: float, what: str
) -> int:
    """How many leading tokens agree; AssertionError if the first difference is not a near tie."""
    for j, (g, e) in enumerate(zip(got, expected)):
        if g != e:
            top2 = np.sort(merged_scores(reference, prompt_ids + expected[:j]))[-2:]
            assert top2[1] - top2[0] <= noise, f"diverged at token {j} on {what!r} (gap {top2[1] - top2[0]:.4g})"
            return j
    return min(len(got), len(expected))
