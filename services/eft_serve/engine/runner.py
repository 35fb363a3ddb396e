"""Running a synchronous engine from async code: one engine turn at a time, off the event loop.

Owns the rules every pool path shares (the in-process pool and the pool RPC behind gRPC or
Ray Serve): calls queue for the engine in arrival order (`TurnQueue`), and every logprobs call
waiting when the engine frees joins its next turn (continuous batching: up to `batching.max_calls`
calls, one engine call); the request's deadline is checked once the call reaches the engine (time
spent queued counts), the engine runs in a worker thread so the event loop keeps serving, and an
engine `ValueError` (bad ids, too long) becomes INVALID_ARGUMENT naming the pool. A cancelled
call frees the engine only when its worker thread ends. `probe` is the replica health check (a
1-token forward under a timeout). Knows nothing of transports, protobuf or Ray.

KV admission: before a call joins the queue, the engine is asked (`LogprobEngine.admit`) whether
the call's sequences fit its KV budget without evicting a running sequence. If not, the call
waits here (polling, backing off to 0.25 s) until running sequences go idle, for at most
`admission_timeout_s` and never past its deadline, then fails with RESOURCE_EXHAUSTED naming the
pool and what to change. Nothing thrashes: a waiting call holds no KV. Engines without a KV budget
of their own (fakes, vLLM with its own scheduler) answer "everything fits" (`EngineBase`).

An engine that batches concurrent calls itself (`schedules_concurrent_calls = True`: vLLM's
continuous batching) is not serialised here: its calls run side by side in worker threads so its
scheduler sees them all at once; the deadline check and the error mapping are the same.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from eft_serve.deadline import raise_if_expired, seconds_left
from eft_serve.engine.turn_queue import DEFAULT_TURN_POLICY, TurnPolicy, TurnQueue
from eft_serve.engine.types import (
    DraftedSequence,
    DraftQuery,
    LogprobEngine,
    ModelInfo,
    SequenceQuery,
    SequenceResult,
    kv_sequence_id,
)
from eft_serve.errors import InvalidArgument, ResourceExhausted, Unavailable

_T = TypeVar("_T")


# Longest a call waits for KV room (within its deadline) before RESOURCE_EXHAUSTED: below the
# coordinator's default pool_call_timeout_s (30 s), so the caller sees why, not a timeout.
ADMISSION_TIMEOUT_S = 20.0
# Threads waiting on an engine that schedules concurrent calls itself (they only block on its
# futures; the default executor's min(32, cores + 4) would cap concurrency at 6 on 2 cores).
_CONCURRENT_CALL_THREADS = 64


class EngineRunner:
    def __init__(
        self,
        engine: LogprobEngine,
        role: str,
        admission_timeout_s: float = ADMISSION_TIMEOUT_S,
        *,
        batching: TurnPolicy = DEFAULT_TURN_POLICY,
    ) -> None:
        self.engine = engine
        self.role = role
        self.admission_timeout_s = admission_timeout_s
        # Calls that had to wait for KV room, and calls refused after waiting (observability, tests).
        self.admission_waits = 0
        self.admission_refusals = 0
        # Called with the seconds each call waited for the engine (queue wait metric), if set.
        self.queue_wait_observer: Callable[[float], None] | None = None
        # One engine turn at a time (torch runs one thread per replica, the KV store is shared),
        # waiting logprobs calls coalesced into each turn.
        self.turns = TurnQueue(
            engine,
            role,
            policy=batching,
            observe_wait=self._observe_wait,
        )
        self._concurrent = engine.schedules_concurrent_calls
        self._executor: ThreadPoolExecutor | None = None

    @property
    def info(self) -> ModelInfo:
        return self.engine.info

    async def next_token_logprobs(
        self, queries: Sequence[SequenceQuery], logprob_top_k: int, deadline: float | None = None
    ) -> list[SequenceResult]:
        await self.admit([(kv_sequence_id(q.sequence_id, q.adapter), len(q.token_ids)) for q in queries], deadline)
        if self._concurrent:
            return await self._run_concurrently(deadline, self.engine.next_token_logprobs, queries, logprob_top_k)
        return await self.turns.logprobs(queries, logprob_top_k, deadline)

    async def draft(
        self, queries: Sequence[DraftQuery], deadline: float | None = None, score_logprob_top_k: int | None = None
    ) -> list[DraftedSequence]:
        """Greedy drafts; with `score_logprob_top_k`, each also scored by this model (see
        `DraftedSequence`) in the same engine turn — the scores are exactly what
        `next_token_logprobs` answers for prefix + draft, because that is how they are computed."""
        await self.admit(
            [(kv_sequence_id(q.sequence_id, q.adapter), len(q.token_ids) + max(0, q.num_tokens)) for q in queries],
            deadline,
        )
        if self._concurrent:
            return await self._run_concurrently(deadline, self._draft, queries, score_logprob_top_k)
        return await self.turns.alone(lambda: self._draft(queries, score_logprob_top_k), deadline)

    async def admit(self, demands: Sequence[tuple[str, int]], deadline: float | None = None) -> None:
        """Wait until every `(sequence_id, positions)` fits the engine's KV budget (see the module
        docstring); ResourceExhausted after `admission_timeout_s` or at the deadline."""
        if not demands:
            return
        verdict = self.engine.admit(demands)
        if verdict.ok:
            return
        self.admission_waits += 1
        started = time.monotonic()
        delay = 0.01
        while True:
            left = min(self.admission_timeout_s - (time.monotonic() - started), seconds_left(deadline))
            if left <= 0:
                self.admission_refusals += 1
                raise ResourceExhausted(
                    f"model pool {self.role!r}: no KV cache room for {verdict.blocked} sequence(s) needing "
                    f"{verdict.need_bytes / 2**20:.1f} MiB after waiting {time.monotonic() - started:.1f}s: "
                    f"{verdict.running} running sequences hold {verdict.running_bytes / 2**20:.1f} of "
                    f"{verdict.max_bytes / 2**20:.1f} MiB. Retry later, or give the pool more KV memory "
                    f"(pools.{self.role}.kv_cache_bytes, or null to size it from memory) or more replicas"
                )
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 0.25)
            verdict = self.engine.admit(demands)
            if verdict.ok:
                return

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

    def _observe_wait(self, seconds: float) -> None:
        if self.queue_wait_observer is not None:
            self.queue_wait_observer(seconds)

    async def _run_concurrently(self, deadline: float | None, fn: Callable[..., _T], *args: Any) -> _T:
        """`fn(*args)` in a worker thread beside other calls (the engine queues them itself)."""
        self._observe_wait(0.0)  # the wait happens in the engine's own scheduler
        raise_if_expired(deadline, f"model pool {self.role!r}")
        if self._executor is None:
            self._executor = ThreadPoolExecutor(_CONCURRENT_CALL_THREADS, thread_name_prefix=f"engine-{self.role}")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, lambda: fn(*args))
        except ValueError as e:
            raise InvalidArgument(f"model pool {self.role!r}: {e}") from None

    def _draft(self, queries: Sequence[DraftQuery], score_logprob_top_k: int | None) -> list[DraftedSequence]:
        drafts = self.engine.draft(queries)
        if score_logprob_top_k is None:
            return [DraftedSequence(d) for d in drafts]
        # The prefix's KV is cached by the draft; scoring re-feeds only the drafted tokens.
        scored = self.engine.next_token_logprobs(
            [
                SequenceQuery(
                    list(q.token_ids) + d, num_positions=len(d) + 1, sequence_id=q.sequence_id, adapter=q.adapter
                )
                for q, d in zip(queries, drafts)
            ],
            score_logprob_top_k,
        )
        return [DraftedSequence(d, s) for d, s in zip(drafts, scored)]
