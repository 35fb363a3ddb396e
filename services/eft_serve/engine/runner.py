"""Running a synchronous engine from async code: one call at a time, off the event loop.

Owns the rules every pool path shares (the in-process pool and the pool RPC behind gRPC or
Ray Serve): calls queue for the engine in arrival order, the request's deadline is checked
once the call reaches the engine (time spent queued counts), the engine runs in a worker
thread so the event loop keeps serving, and an engine `ValueError` (bad ids, too long) becomes
INVALID_ARGUMENT naming the pool. Knows nothing of transports, protobuf or Ray.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from eft_serve.deadline import raise_if_expired
from eft_serve.engine.types import (
    DraftedSequence,
    DraftQuery,
    LogprobEngine,
    ModelInfo,
    SequenceQuery,
    SequenceResult,
)
from eft_serve.errors import InvalidArgument


class EngineRunner:
    def __init__(self, engine: LogprobEngine, role: str) -> None:
        self.engine = engine
        self.role = role
        # One engine call at a time: torch runs one thread per replica and the KV cache is shared.
        self._lock = asyncio.Lock()

    @property
    def info(self) -> ModelInfo:
        return self.engine.info

    async def next_token_logprobs(
        self, queries: Sequence[SequenceQuery], logprob_top_k: int, deadline: float | None = None
    ) -> list[SequenceResult]:
        async with self._lock:
            raise_if_expired(deadline, f"model pool {self.role!r}")
            try:
                return await asyncio.to_thread(self.engine.next_token_logprobs, queries, logprob_top_k)
            except ValueError as e:
                raise InvalidArgument(f"model pool {self.role!r}: {e}") from None

    async def draft(
        self, queries: Sequence[DraftQuery], deadline: float | None = None, score_logprob_top_k: int | None = None
    ) -> list[DraftedSequence]:
        """Greedy drafts; with `score_logprob_top_k`, each also scored by this model (see
        `DraftedSequence`) in the same engine turn — the scores are exactly what
        `next_token_logprobs` answers for prefix + draft, because that is how they are computed."""
        async with self._lock:
            raise_if_expired(deadline, f"model pool {self.role!r}")
            try:
                return await asyncio.to_thread(self._draft, queries, score_logprob_top_k)
            except ValueError as e:
                raise InvalidArgument(f"model pool {self.role!r}: {e}") from None

    def _draft(self, queries: Sequence[DraftQuery], score_logprob_top_k: int | None) -> list[DraftedSequence]:
        drafts = self.engine.draft(queries)
        if score_logprob_top_k is None:
            return [DraftedSequence(d) for d in drafts]
        # The prefix's KV is cached by the draft; scoring re-feeds only the drafted tokens.
        scored = self.engine.next_token_logprobs(
            [
                SequenceQuery(list(q.token_ids) + d, num_positions=len(d) + 1, sequence_id=q.sequence_id)
                for q, d in zip(queries, drafts)
            ],
            score_logprob_top_k,
        )
        return [DraftedSequence(d, s) for d, s in zip(drafts, scored)]
