"""A deterministic stand-in model for tests and benchmarks of everything above the engine boundary.

Owns: ``FakeEngine``, a ``LogprobEngine`` whose next-token logits are a pure function of
(seed, last two tokens) — or of a caller-given table/function — so coordinator, transport and cache
tests run in milliseconds without torch models, and can compute expected answers exactly
(``FakeEngine.logprobs``). Its ``info`` fingerprints are configurable so tests can build pools with
matching or mismatched vocabularies.

Does NOT know: real models, KV caches (``cached_tokens`` is always 0), devices. Query validation
and record building are the real engine's (``logprob_view``), so the fake cannot drift from it.
Test-only: the service never uses it (it lives in `eft_serve.testing`, above the engine it fakes).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from eft_serve.engine.logprob_view import (
    build_position_logprobs,
    candidate_rows,
    validate_draft_queries,
    validate_logprob_top_k,
    validate_queries,
)
from eft_serve.engine.types import DraftQuery, EngineBase, ModelInfo, SequenceQuery, SequenceResult

__all__ = ["FakeEngine", "LogitsFn"]

# prefix (whole token-id tuple) -> unnormalized logits [vocab_size]
LogitsFn = Callable[[tuple[int, ...]], np.ndarray]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class FakeEngine(EngineBase):
    """Logits(prefix) = scale * (R[last] + prev_weight * S[second-to-last]).

    ``R`` and ``S`` are standard-normal rows drawn from ``(seed, token)`` on first use, so any
    vocabulary size is cheap and results never depend on call order. A ``table`` ``[V, V]``
    replaces that with ``table[last]``; a ``logits_fn`` replaces everything.
    """

    def __init__(
        self,
        vocab_size: int = 64,
        seed: int = 0,
        *,
        name: str = "fake",
        logits_fn: LogitsFn | None = None,
        table: np.ndarray | None = None,
        scale: float = 3.0,
        prev_weight: float = 0.3,
        max_context: int = 4096,
        eos_token_id: int | None = None,
        stop_token_ids: Sequence[int] = (),
        vocab_fingerprint: str | None = None,
        model_fingerprint: str | None = None,
        delay_s: float = 0.0,
    ) -> None:
        if vocab_size < 2:
            raise ValueError("vocab_size must be >= 2")
        if table is not None:
            table = np.asarray(table, dtype=np.float64)
            if table.shape != (vocab_size, vocab_size):
                raise ValueError(f"table must be [{vocab_size}, {vocab_size}], got {table.shape}")
        self.vocab_size = int(vocab_size)
        self.seed = int(seed)
        self.scale = float(scale)
        self.prev_weight = float(prev_weight)
        self.delay_s = float(delay_s)
        self._logits_fn = logits_fn
        self._table = table
        self._rows: dict[tuple[int, int], np.ndarray] = {}
        self._lock = threading.Lock()
        # Observability for tests: how the coordinator used this pool.
        self.num_calls = 0
        self.num_draft_calls = 0
        self.num_queries = 0
        self.last_logprob_top_k: int | None = None
        self._info = ModelInfo(
            name=name,
            vocab_size=self.vocab_size,
            max_context=int(max_context),
            eos_token_id=self.vocab_size - 1 if eos_token_id is None else int(eos_token_id),
            # Same vocab size => same vocabulary by default, so fakes of one size can merge.
            vocab_fingerprint=vocab_fingerprint or _sha(f"fake-vocab:{self.vocab_size}"),
            model_fingerprint=model_fingerprint
            or _sha(f"fake-model:{name}:{self.vocab_size}:{self.seed}:{self.scale}:{self.prev_weight}"),
            dtype="float32",
            device="cpu",
            num_parameters=0,
            extra={"fake": "1"},
            stop_token_ids=tuple(int(i) for i in stop_token_ids),
        )

    @property
    def info(self) -> ModelInfo:
        return self._info

    # ------------------------------------------------------------- the "model"
    def _row(self, which: int, token: int) -> np.ndarray:
        key = (which, token)
        with self._lock:
            row = self._rows.get(key)
        if row is None:
            row = np.random.default_rng([self.seed, which, token]).standard_normal(self.vocab_size)
            with self._lock:
                self._rows[key] = row
        return row

    def logits(self, prefix: Sequence[int]) -> np.ndarray:
        """Unnormalized float64 logits of the token after ``prefix`` (non-empty)."""
        toks = tuple(int(t) for t in prefix)
        if not toks:
            raise ValueError("prefix must be non-empty")
        if self._logits_fn is not None:
            out = np.asarray(self._logits_fn(toks), dtype=np.float64)
            if out.shape != (self.vocab_size,):
                raise ValueError(f"logits_fn returned shape {out.shape}, want ({self.vocab_size},)")
            return out
        if self._table is not None:
            row: np.ndarray = self._table[toks[-1]]
            return row
        out = self._row(0, toks[-1]).copy()
        if len(toks) >= 2:
            out += self.prev_weight * self._row(1, toks[-2])
        return self.scale * out

    def logprobs(self, prefix: Sequence[int]) -> np.ndarray:
        """The exact float32 distribution the engine reports after ``prefix``."""
        return self._logprob_rows([tuple(prefix)])[0].numpy()

    def _logprob_rows(self, prefixes: Sequence[Sequence[int]]) -> torch.Tensor:
        logits = np.stack([self.logits(p) for p in prefixes])
        # float64 normalization then float32, like a real engine's float32 log_softmax but exact.
        return torch.from_numpy(logits).log_softmax(dim=-1).float()

    # ------------------------------------------------------------- protocol
    def next_token_logprobs(self, queries: Sequence[SequenceQuery], logprob_top_k: int) -> list[SequenceResult]:
        validate_logprob_top_k(logprob_top_k)
        checked = validate_queries(
            queries, vocab_size=self.vocab_size, max_context=self._info.max_context, model=self._info.name
        )
        with self._lock:
            self.num_calls += 1
            self.num_queries += len(queries)
            self.last_logprob_top_k = logprob_top_k
        if self.delay_s:
            time.sleep(self.delay_s)
        if not queries:
            return []
        prefixes: list[tuple[int, ...]] = []
        cand_rows: list[np.ndarray] = []
        counts: list[int] = []
        for q, (toks, cands) in zip(queries, checked):
            n, m = len(toks), int(q.num_positions)
            for j in range(m):
                prefixes.append(tuple(toks[: n - m + 1 + j].tolist()))
            cand_rows.extend(candidate_rows(q, cands))
            counts.append(m)
        positions = build_position_logprobs(self._logprob_rows(prefixes), logprob_top_k, cand_rows)
        results, start = [], 0
        for m in counts:
            results.append(SequenceResult(positions[start : start + m], cached_tokens=0))
            start += m
        return results

    def draft(self, queries: Sequence[DraftQuery]) -> list[list[int]]:
        prefixes = validate_draft_queries(
            queries, vocab_size=self.vocab_size, max_context=self._info.max_context, model=self._info.name
        )
        with self._lock:
            self.num_draft_calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        out: list[list[int]] = []
        for q, toks in zip(queries, prefixes):
            seq = toks.tolist()
            new: list[int] = []
            for _ in range(q.num_tokens):
                nxt = int(np.argmax(self.logits(seq)))
                new.append(nxt)
                seq.append(nxt)
            out.append(new)
        return out
