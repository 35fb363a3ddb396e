"""One engine turn at a time, with every waiting logprobs call coalesced into the next turn.

Owns the continuous-batching queue in front of an engine that runs one call at a time (HFEngine:
torch runs one thread per replica and its KV store is shared). Callers enqueue work and await a
future; a drain task, alive only while there is work, takes the oldest waiting item and, when it is
a logprobs call, every other waiting logprobs call with the same `logprob_top_k` (up to
`max_calls`), and runs them as ONE engine call in a worker thread. Calls that arrive while the
engine is busy therefore share its next forward passes, whatever transport brought them.

Companions: a pool whose streams decode together serves the same sequences every step, but
they come back a few ms apart (each one's merge and round trip), so the queue otherwise splits
them into alternating half-size turns, and a memory-bound model pays about the same per turn
whatever its batch (docs/benchmarks.md#why-the-engines-work-this-way). Before a
turn, the queue therefore waits up to `wait_s` for the sequences it expects back: those the last
turn answered, and those seen within 1.5× their own interval between calls (so a stream whose
prompt was just prefilled is waited for, and the next turn of prefills does not stall it). A sequence that stopped calling costs at most one such wait; a single
stream never waits.

Chunked prefill (`max_prefill_tokens`, engines whose `uncached_tokens` answers, i.e. HFEngine): a
turn with decoding calls in it feeds at most that many prompt positions beyond its decode rows (a
turn of prefills only has nobody to protect and runs them whole). A call whose prefix is
longer runs a chunk (its first uncached positions, written to the sequence's KV, the answer
dropped) and keeps its place at the head of the queue for the next turn, so one new 2,000-token
prompt delays running streams by a chunk per step, not by the whole prefill. A call whose chunk
made no progress (its KV was not kept) runs whole next time.

Why not Serve's `@serve.batch`: it closes a batch when its wait window ends, not when the engine
frees, so under steady decoding a request that arrives alone becomes a batch of one and queues
behind the others: nearly every engine call runs one request, and the inter-token latency grows
with the number of streams.

Rules: first come, first served (a later call joins an earlier turn, never the reverse); a caller
cancelled while queued never runs; a running engine call is never interrupted (its thread ends, the
result of a caller that left is dropped); each call's deadline is checked when its turn comes;
a `ValueError` from a coalesced turn is retried call by call, so only the bad call fails
(INVALID_ARGUMENT naming the pool).

Does NOT know: KV admission (the runner asks before enqueueing), transports, Ray, protobuf.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from eft_serve.deadline import raise_if_expired
from eft_serve.engine.types import LogprobEngine, SequenceQuery, SequenceResult
from eft_serve.errors import DeadlineExceeded, InvalidArgument

_T = TypeVar("_T")


@dataclass(eq=False)
class _Work:
    future: asyncio.Future[Any]
    deadline: float | None
    # Exactly one of: a coalescible logprobs call, or a call that runs alone (drafts).
    queries: Sequence[SequenceQuery] | None = None
    logprob_top_k: int = 0
    alone: Callable[[], Any] | None = None
    queued_at: float = field(default_factory=time.perf_counter)
    # Uncached positions when this call last ran a prefill chunk (None: never chunked).
    chunked_from: int | None = None


# A call feeding at most this many positions beyond its answers is decoding, never chunked.
_DECODE_SLACK = 16
# Smallest prefill chunk worth a forward of its own.
_MIN_CHUNK = 16


@dataclass(frozen=True)
class TurnPolicy:
    """How a pool's engine turns are filled (`pools.<role>.max_batch_size`,
    `batch_wait_timeout_s` and `max_prefill_tokens_per_turn`; see the module docstring)."""

    max_calls: int = 8  # calls coalesced into one turn
    wait_s: float = 0.0  # longest a turn waits for the sequences it expects back
    max_prefill_tokens: int | None = None  # prompt positions a turn may feed beyond decode rows

    def __post_init__(self) -> None:
        if self.max_calls < 1 or self.wait_s < 0:
            raise ValueError(f"max_calls must be >= 1 and wait_s >= 0, got {self.max_calls} and {self.wait_s}")
        if self.max_prefill_tokens is not None and self.max_prefill_tokens < _MIN_CHUNK:
            raise ValueError(f"max_prefill_tokens must be >= {_MIN_CHUNK} or None, got {self.max_prefill_tokens}")


DEFAULT_TURN_POLICY = TurnPolicy()


class TurnQueue:
    def __init__(
        self,
        engine: LogprobEngine,
        role: str,
        *,
        policy: TurnPolicy = DEFAULT_TURN_POLICY,
        observe_wait: Callable[[float], None] | None = None,
    ) -> None:
        self.engine = engine
        self.role = role
        self.policy = policy
        self.observe_wait = observe_wait
        self.prefill_chunks = 0  # chunks run (tests and observability)
        self.turns = 0  # engine calls made (tests and observability see coalescing happen)
        self.calls = 0  # caller calls those turns served
        self._waiting: deque[_Work] = deque()
        self._drain: asyncio.Task[None] | None = None
        self._drain_loop: asyncio.AbstractEventLoop | None = None
        self._arrived: asyncio.Event | None = None
        # sequence id -> (last enqueue time, interval between its last two calls or None)
        self._seen: dict[str, tuple[float, float | None]] = {}
        self._last_turn: set[str] = set()  # sequences the last logprobs turn answered

    @property
    def where(self) -> str:
        return f"model pool {self.role!r}"

    async def logprobs(
        self, queries: Sequence[SequenceQuery], logprob_top_k: int, deadline: float | None
    ) -> list[SequenceResult]:
        future: asyncio.Future[list[SequenceResult]] = asyncio.get_running_loop().create_future()
        self._submit(_Work(future, deadline, queries=queries, logprob_top_k=logprob_top_k))
        # Cancelling the caller cancels `future`: a queued call is then skipped, a running one dropped.
        return await future

    async def alone(self, fn: Callable[[], _T], deadline: float | None) -> _T:
        """`fn()` in a turn of its own (it still waits its turn in arrival order)."""
        future: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        self._submit(_Work(future, deadline, alone=fn))
        return await future

    def _submit(self, work: _Work) -> None:
        self._waiting.append(work)
        for q in work.queries or ():
            if q.sequence_id:
                last = self._seen.get(q.sequence_id)
                self._seen[q.sequence_id] = (work.queued_at, work.queued_at - last[0] if last else None)
        loop = asyncio.get_running_loop()
        # A drain task of another (closed) loop would never run again: start one in this loop.
        if self._drain is None or self._drain.done() or self._drain_loop is not loop:
            self._arrived = asyncio.Event()
            self._drain = loop.create_task(self._drain_all())
            self._drain_loop = loop
        elif self._arrived is not None:
            self._arrived.set()

    async def _drain_all(self) -> None:
        await asyncio.sleep(0)  # calls that arrive in the same loop pass join the first turn
        while self._waiting:
            await self._await_companions()
            turn = self._take_turn()
            if not turn:
                continue
            try:
                await self._run_turn(turn)
            except Exception as e:  # noqa: BLE001  # a bug here must fail its callers, never strand them
                for w in turn:
                    _settle(w, error=e)

    def _expected(self) -> set[str]:
        """The sequences a turn waits for (see the module docstring); forgets long-gone ones.
        Computed once per turn, not on every arrival while waiting."""
        now = time.perf_counter()
        for sid, (last, interval) in list(self._seen.items()):
            if now - last > 60 + 1.5 * (interval or 0.0):
                del self._seen[sid]
        return {
            sid
            for sid, (last, interval) in self._seen.items()
            if sid in self._last_turn or (interval is not None and now - last <= 1.5 * interval)
        }

    def _missing(self, expected: set[str]) -> bool:
        """Whether the turn should keep waiting: a logprobs call heads the queue, the turn is not
        full, and some expected sequence has no call waiting."""
        head = next((w for w in self._waiting if not w.future.done()), None)
        if head is None or head.alone is not None:
            return False
        waiting = [w for w in self._waiting if w.queries is not None and not w.future.done()]
        if len(waiting) >= self.policy.max_calls:
            return False
        present = {q.sequence_id for w in waiting for q in w.queries or ()}
        return not expected <= present

    async def _await_companions(self) -> None:
        if self.policy.wait_s <= 0 or self._arrived is None:
            return
        expected = self._expected()
        until = time.perf_counter() + self.policy.wait_s
        while expected and self._missing(expected):
            left = until - time.perf_counter()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                return

    def _take_turn(self) -> list[_Work]:
        """The oldest live call and, if it is a logprobs call, the live ones that can join it."""
        while self._waiting and self._waiting[0].future.done():
            self._waiting.popleft()
        if not self._waiting:
            return []
        head = self._waiting.popleft()
        if head.alone is not None:
            return [head]
        turn, rest = [head], deque[_Work]()
        for w in self._waiting:
            if w.future.done():
                continue
            if w.queries is not None and w.logprob_top_k == head.logprob_top_k and len(turn) < self.policy.max_calls:
                turn.append(w)
            else:
                rest.append(w)
        self._waiting = rest
        return turn

    async def _run_turn(self, turn: list[_Work], *, retry: bool = False) -> None:
        now = time.perf_counter()
        live: list[_Work] = []
        for w in turn:
            if self.observe_wait is not None and not retry and w.chunked_from is None:
                self.observe_wait(now - w.queued_at)
            try:
                raise_if_expired(w.deadline, self.where)
            except DeadlineExceeded as e:
                _settle(w, error=e)
                continue
            live.append(w)
        if not live:
            return
        if live[0].alone is not None:
            await self._engine_turn(live, live[0].alone)
            return
        top_k = live[0].logprob_top_k
        self._last_turn = {q.sequence_id for w in live for q in w.queries or () if q.sequence_id}
        live, chunks, deferred = self._plan_prefill(live, retry)
        queries = [q for w in live for q in (w.queries or ())] + chunks
        results = await self._engine_turn(live, lambda: self.engine.next_token_logprobs(queries, top_k))
        if chunks and (results is _RETRY_ONE_BY_ONE or results is None):
            for w in deferred:
                w.chunked_from = 0  # the turn failed: run whole next time (its own error, if any)
        if results is _RETRY_ONE_BY_ONE:
            for w in live:
                await self._run_turn([w], retry=True)
            return
        if results is None:
            return
        start = 0
        for w in live:
            n = len(w.queries or ())
            _settle(w, result=results[start : start + n])
            start += n

    def _plan_prefill(self, live: list[_Work], retry: bool) -> tuple[list[_Work], list[SequenceQuery], list[_Work]]:
        """Split a logprobs turn under the prefill budget: the calls that run whole, plus chunk
        queries for calls that go back to the head of the queue (see the module docstring)."""
        uncached_of = self.engine.uncached_tokens
        # A lone call has no decoder beside it to protect: skip the per-step prefix comparison.
        if self.policy.max_prefill_tokens is None or retry or len(live) < 2:
            return live, [], []
        budget = self.policy.max_prefill_tokens
        whole: list[_Work] = []
        prefills: list[tuple[_Work, SequenceQuery, int]] = []
        for w in live:
            qs = list(w.queries or ())
            u = uncached_of(qs[0]) if len(qs) == 1 else None
            if u is None or u <= qs[0].num_positions + _DECODE_SLACK:
                whole.append(w)  # decoding (or not chunkable): always in the turn
            else:
                prefills.append((w, qs[0], u))
        if not whole:
            return live, [], []  # nobody is decoding: nothing to protect, prefills run whole
        chunks: list[SequenceQuery] = []
        deferred: list[_Work] = []
        for w, q, u in prefills:
            stalled = w.chunked_from is not None and u >= w.chunked_from  # its last chunk was not kept
            if stalled or u <= budget:
                whole.append(w)
                budget -= min(u, budget)
                continue
            if budget >= _MIN_CHUNK:
                chunks.append(self._chunk(w, q, u, budget))
                budget = 0
            deferred.append(w)
        for w in reversed(deferred):
            self._waiting.appendleft(w)  # keeps its place: first in line for the next turn
        return whole, chunks, deferred

    def _chunk(self, w: _Work, q: SequenceQuery, uncached: int, size: int) -> SequenceQuery:
        w.chunked_from = uncached
        self.prefill_chunks += 1
        cut = len(q.token_ids) - uncached + size
        return SequenceQuery(
            token_ids=list(q.token_ids[:cut]), num_positions=1, sequence_id=q.sequence_id, adapter=q.adapter
        )

    async def _engine_turn(self, live: list[_Work], fn: Callable[[], Any]) -> Any:
        """Run `fn` in a worker thread; settle `live` with its error (or, for a lone call, result).
        Returns the result for a coalesced turn, None once settled, or `_RETRY_ONE_BY_ONE`."""
        self.turns += 1
        self.calls += len(live)
        try:
            result = await asyncio.to_thread(fn)
        except ValueError as e:
            if len(live) != 1:
                return _RETRY_ONE_BY_ONE  # find the bad call; its turn-mates still get answers
            _settle(live[0], error=InvalidArgument(f"{self.where}: {e}"))
            return None
        except Exception as e:  # noqa: BLE001  # every caller of the turn sees the engine's failure
            for w in live:
                _settle(w, error=e)
            return None
        if live and live[0].alone is not None:
            _settle(live[0], result=result)
            return None
        return result


_RETRY_ONE_BY_ONE = object()


def _settle(work: _Work, *, result: Any = None, error: BaseException | None = None) -> None:
    if work.future.done():  # the caller left (cancelled): nothing to deliver
        return
    if error is not None:
        work.future.set_exception(error)
    else:
        work.future.set_result(result)
