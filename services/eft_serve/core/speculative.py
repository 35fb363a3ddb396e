"""Verification step of speculative decoding (Mitchell et al., EFT, §4.3).

A drafter proposed k tokens d_0..d_{k-1} after a prefix of length n; the target (merged EFT)
distributions at the k + 1 positions of the block were computed in one pass: `target[j]` is the
merged distribution of the token at absolute position n + j given prefix + d_0..d_{j-1}.

Owns deciding which drafted tokens to keep and the one token that follows them (chosen from the
target), under one of two acceptance rules:

* ``"coupled"`` (default): at each position j the token is chosen exactly as plain decoding
  would choose it, ``choose_token(target[j], params, n + j)``; a drafted token is kept iff it
  equals that choice. Sampling randomness is *coupled*: the uniform of position t depends only
  on (seed, t) (see `sampling.position_uniform`), never on how many tokens were drawn before or
  on whether they came from a speculative block. So while the draft agrees with the target's
  choices, target[j] is the very distribution plain decoding sees at position n + j, and the
  token chosen there is the very token plain decoding picks; the first disagreement is replaced
  by that same token. The output is therefore token-for-token identical to non-speculative
  decoding for every seed (and trivially for greedy, temperature 0).
* ``"rejection"``: standard speculative rejection sampling for a point-mass (greedy) draft
  q_j = δ(d_j): keep d_j with probability p_j(d_j), otherwise emit a sample of the residual
  max(0, p_j − q_j) (p_j with d_j removed, renormalised) and stop; if all k are kept, the last
  token is sampled from p_k. Here p_j is the sampling distribution of target[j] after
  temperature/top-k/top-p (the argmax point mass for greedy). The output is distributed exactly
  as sampling from p position by position, but is not the same token sequence as plain decoding
  for a given seed. Its uniforms are derived streams of the position's coupled randomness,
  reproducible per (seed, position) and independent of the token-choice uniform.

Knows nothing about models, worker pools, caches or transports: pure numpy over the core types.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from eft_serve.core.merge import MergedDistribution
from eft_serve.core.sampling import SamplingParams, choose_token, sampling_distribution

AcceptanceRule = Literal["coupled", "rejection"]

# Sub-streams of a position's randomness used only by the rejection rule. Stream ``[seed, t]``
# (no suffix) is `position_uniform`, the token-choice uniform; these are independent of it.
_ACCEPT_STREAM = 1
_RESIDUAL_STREAM = 2


@dataclass(frozen=True)
class BlockVerdict:
    # The accepted draft prefix followed by exactly one token chosen from the target: 1..k+1 tokens.
    tokens: list[int]
    # How many drafted tokens were kept (0..k).
    accepted: int


def verify_block(
    target: Sequence[MergedDistribution],
    draft: Sequence[int],
    params: SamplingParams,
    first_position: int,
    rule: AcceptanceRule = "coupled",
) -> BlockVerdict:
    """Decide how much of `draft` to keep and which target token follows it.

    `target` holds k + 1 distributions for a draft of k tokens (k may be 0: one plain step);
    `first_position` is the absolute position n of the first drafted token.
    """
    if len(target) != len(draft) + 1:
        raise ValueError(
            f"speculative block needs one target distribution per drafted token plus one, "
            f"got {len(target)} distributions for {len(draft)} drafted tokens"
        )
    if rule == "coupled":
        return _verify_coupled(target, draft, params, first_position)
    if rule == "rejection":
        return _verify_rejection(target, draft, params, first_position)
    raise ValueError(f"unknown acceptance rule {rule!r}; expected 'coupled' or 'rejection'")


def _verify_coupled(
    target: Sequence[MergedDistribution], draft: Sequence[int], params: SamplingParams, first_position: int
) -> BlockVerdict:
    tokens: list[int] = []
    for j, dist in enumerate(target):
        chosen = choose_token(dist, params, position=first_position + j)
        tokens.append(chosen)
        if j == len(draft) or chosen != int(draft[j]):
            return BlockVerdict(tokens=tokens, accepted=j)
    raise AssertionError("unreachable: the loop returns at the last target position")


def _verify_rejection(
    target: Sequence[MergedDistribution], draft: Sequence[int], params: SamplingParams, first_position: int
) -> BlockVerdict:
    tokens: list[int] = []
    for j, drafted in enumerate(int(d) for d in draft):
        dist = target[j]
        position = first_position + j
        probs = target_probs(dist, params)
        idx = _support_index(dist, drafted)
        p_draft = float(probs[idx]) if idx is not None else 0.0
        # u ∈ [0, 1): p = 1 always accepts, p = 0 (outside the support or truncated) never does.
        if _stream_uniform(params.seed, position, _ACCEPT_STREAM) < p_draft:
            tokens.append(drafted)
            continue
        residual = probs.copy()
        if idx is not None:
            residual[idx] = 0.0
        total = float(residual.sum())
        if total <= 0.0:
            # Only reachable through rounding (p_draft a hair under 1 with nothing else possible):
            # p is the point mass at the drafted token, so keeping it is exact.
            tokens.append(drafted)
            continue
        residual /= total
        pick = _inverse_cdf(residual, _stream_uniform(params.seed, position, _RESIDUAL_STREAM))
        tokens.append(int(dist.support[pick]))
        return BlockVerdict(tokens=tokens, accepted=j)
    # Every drafted token kept: the bonus token is a plain draw from p_k at its own position.
    k = len(draft)
    tokens.append(choose_token(target[k], params, position=first_position + k))
    return BlockVerdict(tokens=tokens, accepted=k)


def target_probs(dist: MergedDistribution, params: SamplingParams) -> np.ndarray:
    """The distribution `choose_token` samples from, over `dist.support`.

    For greedy (temperature 0) that is the point mass at the argmax, ties to the lowest id,
    exactly as `choose_token` decides; otherwise `sampling_distribution`.
    """
    if params.greedy:
        probs = np.zeros(len(dist.support), dtype=np.float64)
        probs[int(np.argmax(dist.logprobs))] = 1.0
        return probs
    return sampling_distribution(dist, params)


def _support_index(dist: MergedDistribution, token_id: int) -> int | None:
    i = int(np.searchsorted(dist.support, token_id))
    if i < len(dist.support) and int(dist.support[i]) == token_id:
        return i
    return None


def _stream_uniform(seed: int, position: int, stream: int) -> float:
    """A uniform on [0, 1) from sub-stream `stream` of position `position`'s coupled randomness."""
    return float(np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, position, stream]).random())


def _inverse_cdf(probs: np.ndarray, u: float) -> int:
    """Index drawn from `probs` (sums to 1) by inverse CDF over ascending ids, as `choose_token` does."""
    idx = int(np.searchsorted(np.cumsum(probs), u, side="right"))
    idx = min(idx, len(probs) - 1)
    # Never land on a zero-probability token at the top edge of the cumulative sum.
    while probs[idx] == 0.0 and idx > 0:
        idx -= 1
    return idx
