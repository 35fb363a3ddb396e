"""Running a synchronous engine from async code: one call at a time, off the event loop.

Owns the rules every pool path shares (the in-process pool and the pool RPC behind gRPC or
Ray Serve): calls queue for the engine in arrival order, the request's deadline is checked
once the call reaches the engine (time spent queued counts), the engine runs in a worker
thread so the event loop keeps serving, and an engine `ValueError` (bad ids, too long) becomes
INVALID_ARGUMENT naming the pool. A cancelled call frees the engine only when its worker thread
ends. `probe` is the replica health check (a 1-token forward under a timeout). Knows nothing of
transports, protobuf or Ray.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from eft_serve.deadline import raise_if_expired
from eft_serve.engine.types import (
    DraftedSequence,
    DraftQuery,
    LogprobEngine,
    ModelInfo,
    SequenceQuery,
    SequenceResult,
)
from eft_serve.errors import InvalidArgument, Unavailable

_T = TypeVar("_T")


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
        return await self._run(deadline, self.engine.next_token_logprobs, queries, logprob_top_k)

    async def draft(
        self, queries: Sequence[DraftQuery], deadline: float | None = None, score_logprob_top_k: int | None = None
    ) -> list[DraftedSequence]:
        """Greedy drafts; with `score_logprob_top_k`, each also scored by this model (see
        `DraftedSequence`) in the same engine turn — the scores are exactly what
        `next_token_logprobs` answers for prefix + draft, because that is how they are computed."""
        return await self._run(deadline, self._draft, queries, score_logprob_top_k)

    async def probe(self, timeout_s: float) -> None:
        """A liveness check: one 1-token forward (top-1), queued like any call; raises Unavailable
        if it fails or does not finish within `timeout_s` (a hung or wedged engine)."""
        query = SequenceQuery(token_ids=[self.info.eos_token_id], num_positions=1)
        try:
            await asyncio.wait_for(self.next_token_logprobs([query], 1), timeout_s)
        except TimeoutError:
            raise Unavailable(
                f"model pool {self.role!r}: a 1-token health check did not finish within {timeout_s:g}s"
            ) from None
        except Exception as e:
            raise Unavailable(f"model pool {self.role!r}: health check failed: {type(e).__name__}: {e}") from e

    async def _run(self, deadline: float | None, fn: Callable[..., _T], *args: Any) -> _T:
        """`fn(*args)` in a worker thread, alone on the engine. A cancelled caller (client gone,
        a timeout) returns at once, but the lock is held until the thread ends: a running engine
        call cannot be stopped, and the next one must not overlap it."""
        await self._lock.acquire()
        try:
            raise_if_expired(deadline, f"model pool {self.role!r}")
            work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        except BaseException:
            self._lock.release()
            raise
        work.add_done_callback(self._release)
        try:
            return await asyncio.shield(work)
        except ValueError as e:
            raise InvalidArgument(f"model pool {self.role!r}: {e}") from None

    def _release(self, work: asyncio.Future[Any]) -> None:
        self._lock.release()
        if not work.cancelled():
            work.exception()  # retrieved: a caller that was cancelled no longer awaits it

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
