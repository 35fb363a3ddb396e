"""The engine-side view of one call: validate queries, turn logprob rows into ``PositionLogprobs``.

Owns the rules every engine (real or fake) must apply identically: what a valid query is (with
actionable ``ValueError`` messages) and how a normalized next-token distribution becomes the
boundary record (top-k sorted descending, tail mass outside the top-k, candidate logprobs, or the
full vocabulary when ``logprob_top_k == 0``). Written once so the fake engine cannot drift from the real one.

Does NOT know: models, KV caches, batching, devices beyond "a torch tensor lives somewhere".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from eft_serve.engine.types import DraftQuery, PositionLogprobs, SequenceQuery

__all__ = [
    "build_position_logprobs",
    "restrict_to_support",
    "tokenizer_support",
    "candidate_rows",
    "validate_draft_queries",
    "validate_queries",
    "validate_logprob_top_k",
]


def tokenizer_support(tokenizer_size: int, head_rows: int, model: object) -> int:
    """The ids a model's distributions range over: the tokenizer's ``[0, tokenizer_size)``.

    Output heads are often padded beyond the tokenizer (to a multiple of 64/128, or per model size
    within one family); those rows are no token, so they never enter a merge. A tokenizer with more
    ids than the head has rows names tokens the model cannot score: refused.
    """
    if tokenizer_size < 1:
        raise ValueError(f"{model}: the tokenizer defines no tokens")
    if tokenizer_size > head_rows:
        raise ValueError(
            f"{model}: the tokenizer defines {tokenizer_size} ids but the model's output head has only "
            f"{head_rows} rows; this tokenizer does not belong to this model (point tokenizer files at the "
            f"model's own)"
        )
    return int(tokenizer_size)


def restrict_to_support(logprobs: np.ndarray, support: int) -> np.ndarray:
    """Rows of full-head logprobs ``[..., head_rows]`` renormalised over the first ``support`` ids."""
    head = np.asarray(logprobs, dtype=np.float64)[..., :support]
    peak = head.max(axis=-1, keepdims=True)
    norm = peak + np.log(np.exp(head - peak).sum(axis=-1, keepdims=True))
    out: np.ndarray = (head - norm).astype(np.float32)
    return out


def validate_logprob_top_k(logprob_top_k: int) -> None:
    if not isinstance(logprob_top_k, (int, np.integer)) or isinstance(logprob_top_k, bool) or logprob_top_k < 0:
        raise ValueError(f"logprob_top_k must be an int >= 0 (0 = full vocabulary), got {logprob_top_k!r}")


def _check_ids(ids: Sequence[int], limit: int, what: str, query_index: int, model: str) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.size == 0:
        return arr.astype(np.int64).reshape(0)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"query {query_index}: {what} must be a flat sequence of ints, got dtype {arr.dtype} shape {arr.shape}"
        )
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= limit:
        bad = int(arr[(arr < 0) | (arr >= limit)][0])
        raise ValueError(
            f"query {query_index}: {what} contains id {bad}, outside [0, {limit}) of model "
            f"{model!r}; pools that merge must share one vocabulary (compare vocab fingerprints)"
        )
    return arr.astype(np.int64, copy=False)


def validate_queries(
    queries: Sequence[SequenceQuery],
    *,
    vocab_size: int,
    max_context: int,
    model: str,
    input_vocab_size: int | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Check every query; return (token_ids, candidate_ids) as int64 arrays per query.

    ``input_vocab_size`` bounds prompt ids when the input embedding is smaller than the output
    head (rare; defaults to ``vocab_size``). Candidates are bounded by the output vocabulary.
    """
    in_vocab = vocab_size if input_vocab_size is None else input_vocab_size
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for i, q in enumerate(queries):
        n = len(q.token_ids)
        if n == 0:
            raise ValueError(f"query {i}: token_ids is empty; send at least one token (e.g. BOS) to condition on")
        if n > max_context:
            raise ValueError(
                f"query {i}: {n} tokens exceed max_context {max_context} of model {model!r}; "
                f"the caller must truncate or refuse the prompt (engines never truncate)"
            )
        m = q.num_positions
        if not isinstance(m, (int, np.integer)) or m < 1 or m > n:
            raise ValueError(f"query {i}: num_positions must be in [1, len(token_ids)={n}], got {m!r}")
        toks = _check_ids(q.token_ids, in_vocab, "token_ids", i, model)
        cands = _check_ids(q.candidate_ids, vocab_size, "candidate_ids", i, model)
        if len(q.position_candidate_ids):
            if len(q.position_candidate_ids) != m:
                raise ValueError(
                    f"query {i}: position_candidate_ids must give one list per position ({m}), "
                    f"got {len(q.position_candidate_ids)}"
                )
            if cands.size:
                raise ValueError(f"query {i}: send candidate_ids or position_candidate_ids, not both")
            for c in q.position_candidate_ids:
                _check_ids(c, vocab_size, "position_candidate_ids", i, model)
        out.append((toks, cands))
    return out


def candidate_rows(query: SequenceQuery, candidates: np.ndarray) -> list[np.ndarray]:
    """The candidate ids of each of `query`'s positions (for `build_position_logprobs`): its
    per-position lists when it has them, else `candidates` (its checked `candidate_ids`) at every
    position. Call after `validate_queries`."""
    if len(query.position_candidate_ids):
        return [np.asarray(c, dtype=np.int64).reshape(-1) for c in query.position_candidate_ids]
    return [candidates] * int(query.num_positions)


def validate_draft_queries(
    queries: Sequence[DraftQuery],
    *,
    vocab_size: int,
    max_context: int,
    model: str,
    input_vocab_size: int | None = None,
) -> list[np.ndarray]:
    """Check draft queries; return their token ids as int64 arrays."""
    in_vocab = vocab_size if input_vocab_size is None else input_vocab_size
    out: list[np.ndarray] = []
    for i, q in enumerate(queries):
        n = len(q.token_ids)
        if n == 0:
            raise ValueError(f"draft query {i}: token_ids is empty; send at least one token")
        k = q.num_tokens
        if not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"draft query {i}: num_tokens must be an int >= 0, got {k!r}")
        # Producing k tokens runs forwards over prefixes of length n .. n+k-1.
        if n + max(k, 1) - 1 > max_context:
            raise ValueError(
                f"draft query {i}: {n} tokens + {k} drafted exceed max_context {max_context} of "
                f"model {model!r} (need len(token_ids) + num_tokens - 1 <= max_context)"
            )
        out.append(_check_ids(q.token_ids, in_vocab, "token_ids", i, model))
    return out


def build_position_logprobs(
    logprobs: torch.Tensor,
    logprob_top_k: int,
    candidate_ids: Sequence[np.ndarray | Sequence[int]],
) -> list[PositionLogprobs]:
    """Turn normalized logprob rows ``[N, V]`` (float32, any device) into ``N`` records.

    ``candidate_ids[r]`` are the candidates of row ``r`` (rows of one query share a list). The
    heavy work (top-k, tail, gathers) runs batched on the tensor's device and crosses to the host
    once, so a GPU engine moves ``N * (k + c)`` numbers rather than ``N * V``.
    """
    if logprobs.ndim != 2:
        raise ValueError(f"expected [positions, vocab] logprobs, got shape {tuple(logprobs.shape)}")
    if len(candidate_ids) != logprobs.shape[0]:
        raise ValueError("candidate_ids must give one list per logprob row")
    validate_logprob_top_k(logprob_top_k)
    lp = logprobs.float()
    n_rows, vocab = lp.shape
    device = lp.device

    # Candidates: pad ragged lists to one gather, slice back per row on the host.
    counts = [len(c) for c in candidate_ids]
    max_c = max(counts, default=0)
    cand_host: np.ndarray = np.zeros((n_rows, 0), dtype=np.float32)
    if max_c > 0:
        idx = np.zeros((n_rows, max_c), dtype=np.int64)
        for r, c in enumerate(candidate_ids):
            idx[r, : len(c)] = np.asarray(c, dtype=np.int64)
        cand_host = lp.gather(1, torch.from_numpy(idx).to(device)).cpu().numpy()

    empty_ids = np.zeros(0, dtype=np.int64)
    empty_lp = np.zeros(0, dtype=np.float32)
    out: list[PositionLogprobs] = []

    if logprob_top_k == 0:
        full = lp.cpu().numpy()
        for r in range(n_rows):
            out.append(
                PositionLogprobs(
                    top_ids=empty_ids,
                    top_logprobs=empty_lp,
                    candidate_logprobs=cand_host[r, : counts[r]].copy(),
                    tail_logmass=-math.inf,
                    full_logprobs=full[r].copy(),
                )
            )
        return out

    k = min(int(logprob_top_k), vocab)
    top_lp, top_idx = torch.topk(lp, k, dim=-1, largest=True, sorted=True)
    if k >= vocab:
        tail = torch.full((n_rows,), -math.inf, device=device)
    else:
        # log(mass outside top-k) as a logsumexp over the complement: exact even when the tail
        # is tiny, where log1p(-sum(exp(top))) would cancel to log(0) in float32.
        rest = lp.scatter(1, top_idx, -math.inf)
        tail = torch.logsumexp(rest, dim=-1)
        # Rows whose whole mass is in the top-k come out as -inf already; NaN cannot arise
        # (at least one finite entry per normalized row), but keep the record well-formed.
        tail = torch.nan_to_num(tail, nan=-math.inf)
    top_lp_h = top_lp.cpu().numpy()
    top_idx_h = top_idx.cpu().numpy().astype(np.int64, copy=False)
    tail_h = tail.cpu().numpy()
    for r in range(n_rows):
        out.append(
            PositionLogprobs(
                top_ids=top_idx_h[r].copy(),
                top_logprobs=top_lp_h[r].copy(),
                candidate_logprobs=cand_host[r, : counts[r]].copy(),
                tail_logmass=float(tail_h[r]),
                full_logprobs=None,
            )
        )
    return out
