"""Choosing the next token from a merged distribution: greedy, temperature, top-k, top-p, seed.

Owns the sampling parameters' validation and the draw. Randomness is *coupled* per position:
the uniform draw for position t depends only on (seed, t), and tokens are laid out by ascending
id, so the same seed and distribution always give the same token — the property speculative
decoding relies on. Knows nothing about models or merging.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from eft_serve.core.merge import MergedDistribution, top_p_mask
from eft_serve.errors import InvalidArgument


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int = 0
    max_new_tokens: int = 64
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, max_new_tokens_cap: int, max_stop_strings: int = 16) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgument(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens <= 0:
            raise InvalidArgument(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.max_new_tokens > max_new_tokens_cap:
            raise InvalidArgument(
                f"max_new_tokens {self.max_new_tokens} exceeds this server's cap of {max_new_tokens_cap}"
            )
        if len(self.stop) > max_stop_strings:
            raise InvalidArgument(f"at most {max_stop_strings} stop strings are allowed, got {len(self.stop)}")
        if any(s == "" for s in self.stop):
            raise InvalidArgument("stop strings must be non-empty")


def position_uniform(seed: int, position: int) -> float:
    """The coupled uniform draw for one position."""
    return float(np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, position]).random())


def sampling_distribution(dist: MergedDistribution, params: SamplingParams) -> np.ndarray:
    """Probabilities over dist.support after temperature, top-k and top-p (sums to 1)."""
    logits = dist.logprobs / params.temperature
    keep = np.isfinite(logits)
    if params.top_k and params.top_k < int(keep.sum()):
        kth = np.sort(logits[keep])[-params.top_k]
        keep &= logits >= kth
    logits = np.where(keep, logits, -np.inf)
    logits = logits - np.max(logits)
    probs = np.exp(logits)
    probs /= probs.sum()
    if params.top_p < 1.0:
        mask = top_p_mask(np.log(np.maximum(probs, 1e-300)), params.top_p) & (probs > 0)
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return probs


def choose_token(dist: MergedDistribution, params: SamplingParams, position: int) -> int:
    if params.greedy:
        # argmax returns the first maximum: ties go to the lowest token id (support is ascending).
        return int(dist.support[int(np.argmax(dist.logprobs))])
    probs = sampling_distribution(dist, params)
    u = position_uniform(params.seed, position)
    idx = int(np.searchsorted(np.cumsum(probs), u, side="right"))
    idx = min(idx, len(probs) - 1)
    # Never land on a zero-probability token at the top edge of the cumulative sum.
    while probs[idx] == 0.0 and idx > 0:
        idx -= 1
    return int(dist.support[idx])
