"""Per-token logprob arithmetic: score(x) = Σ_i w_i · log p_i(x), renormalised (paper Eq. 4–5).

Owns building the merge support from (possibly top-k truncated) per-model results, the tail
estimate for tokens a model did not report, and conservative decoding. Knows nothing about
models, transports or sampling.

Exactness: with full-vocabulary inputs the result is exact. With top-k inputs the support is the
union of every model's top-k (plus candidate ids); a token missing from one model's top-k gets
that model's tail mass spread uniformly over the tokens it did not report. Candidate ids are
exact in every model, which is how `Score` and drafts stay exact in top-k mode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from eft_serve.core.recipe import ResolvedRecipe
from eft_serve.engine.types import PositionLogprobs

_NEG_INF = -np.inf


@dataclass
class MergedDistribution:
    """A normalised distribution over `support` (token ids, ascending)."""

    support: np.ndarray  # int64 [n], ascending
    logprobs: np.ndarray  # float64 [n], logsumexp == 0
    # Each model's logprob for every support token (exact or tail-estimated).
    model_logprobs: dict[str, np.ndarray]

    def logprob_of(self, token_id: int) -> float:
        i = int(np.searchsorted(self.support, token_id))
        if i < len(self.support) and self.support[i] == token_id:
            return float(self.logprobs[i])
        return float(_NEG_INF)

    def top(self, n: int) -> list[tuple[int, float]]:
        """The `n` most likely support tokens as (token id, logprob), descending; ties go to the lower id.

        Only support tokens can appear: in top-k mode that is the union of the models' top-k (the
        distribution that is sampled from), so fewer than `n` come back when the support is smaller.
        """
        return _top_of(self.support, self.logprobs, n)

    def model_top(self, role: str, n: int) -> list[tuple[int, float]]:
        """The `n` support tokens most likely under `role` alone, as (token id, that model's logprob).

        Descending, ties to the lower id. Exact when `n` is at most the model's reported top-k (its
        top-k ids are all in the support with their own values; any other support token holds at
        most its tail estimate, which is no more than the k-th value) or in exact mode.
        """
        return _top_of(self.support, self.model_logprobs[role], n)

    def model_logprob_of(self, role: str, token_id: int) -> float:
        i = int(np.searchsorted(self.support, token_id))
        if i < len(self.support) and self.support[i] == token_id:
            return float(self.model_logprobs[role][i])
        return float(_NEG_INF)


def _top_of(support: np.ndarray, logprobs: np.ndarray, n: int) -> list[tuple[int, float]]:
    if n <= 0 or not len(support):
        return []
    idx = np.arange(len(support))
    if n < len(idx):
        # Exact mode's support is the whole vocabulary (10^5 tokens): select before sorting,
        # keeping every token tied with the n-th value so the tie-break below stays exact.
        kth = np.partition(logprobs, len(idx) - n)[len(idx) - n]
        idx = np.flatnonzero(logprobs >= kth)
    # lexsort sorts by the last key first: logprob descending, then token id ascending.
    order = idx[np.lexsort((support[idx], -logprobs[idx]))][:n]
    return [(int(support[i]), float(logprobs[i])) for i in order]


def logsumexp(x: np.ndarray) -> float:
    m = float(np.max(x)) if x.size else _NEG_INF
    if not np.isfinite(m):
        return m
    return m + float(np.log(np.sum(np.exp(x - m))))


def _support(results: Mapping[str, PositionLogprobs], candidate_ids: Sequence[int], vocab_size: int) -> np.ndarray:
    if any(r.full_logprobs is not None for r in results.values()):
        return np.arange(vocab_size, dtype=np.int64)
    parts = [np.asarray(r.top_ids, dtype=np.int64) for r in results.values()]
    parts.append(np.asarray(candidate_ids, dtype=np.int64))
    return np.unique(np.concatenate(parts))


def _values_on(
    support: np.ndarray, result: PositionLogprobs, candidate_ids: Sequence[int], vocab_size: int
) -> np.ndarray:
    if result.full_logprobs is not None:
        full = np.asarray(result.full_logprobs, dtype=np.float64)
        values: np.ndarray = full[support]
        return values
    top_ids = np.asarray(result.top_ids, dtype=np.int64)
    unreported = vocab_size - len(top_ids)
    # Mass the model put outside its top-k, spread evenly over what it did not report.
    tail = float(result.tail_logmass) - np.log(unreported) if unreported > 0 else _NEG_INF
    values = np.full(len(support), tail, dtype=np.float64)
    if len(candidate_ids):
        cand = np.asarray(candidate_ids, dtype=np.int64)
        values[np.searchsorted(support, cand)] = np.asarray(result.candidate_logprobs, dtype=np.float64)
    if len(top_ids):
        values[np.searchsorted(support, top_ids)] = np.asarray(result.top_logprobs, dtype=np.float64)
    return values


def top_p_mask(logprobs: np.ndarray, top_p: float) -> np.ndarray:
    """Boolean mask of the smallest set of tokens whose probability reaches `top_p`."""
    order = np.argsort(-logprobs, kind="stable")
    probs = np.exp(logprobs[order])
    cum = np.cumsum(probs)
    # Keep every token whose preceding cumulative mass is still below top_p.
    keep_sorted = (cum - probs) < top_p
    mask = np.zeros(len(logprobs), dtype=bool)
    mask[order[keep_sorted]] = True
    return mask


def merge_position(
    recipe: ResolvedRecipe,
    results: Mapping[str, PositionLogprobs],
    vocab_size: int,
    candidate_ids: Sequence[int] = (),
    conservative_top_p: float | None = None,
) -> MergedDistribution:
    """Merge one position's per-model results with the recipe's weights.

    `conservative_top_p`: when set, outside each expert's top-p set the ratio p_ft/p_ref is 1
    (its term contributes 0), so the base model alone decides there (paper §4.4).
    """
    support = _support(results, candidate_ids, vocab_size)
    values = {role: _values_on(support, results[role], candidate_ids, vocab_size) for role in recipe.roles}
    score = values[recipe.base].copy()
    for role, weight in recipe.experts:
        if weight == 0.0:
            continue
        assert recipe.reference is not None
        delta = values[role] - values[recipe.reference]
        if conservative_top_p is not None:
            delta = np.where(top_p_mask(values[role], conservative_top_p), delta, 0.0)
        # -inf − -inf is nan: a token impossible in both models stays impossible.
        delta = np.where(np.isnan(delta), _NEG_INF, delta)
        score = score + weight * delta
    score = np.where(np.isnan(score), _NEG_INF, score)
    norm = logsumexp(score)
    if not np.isfinite(norm):
        # Degenerate (every token -inf): fall back to the base model alone rather than fail.
        score, norm = values[recipe.base], logsumexp(values[recipe.base])
    return MergedDistribution(support=support, logprobs=score - norm, model_logprobs=values)
