"""One pool call per replica per decoding step: concurrent streams' logprobs calls coalesced.

Owns the coordinator-side half of continuous batching. Streams decoding together on one
coordinator replica all wake when the same pool answer arrives and each asks every pool for its
next step in the same event-loop turn; sent one by one, that is a Serve call per stream per pool
per step (at 8 streams: 24 calls a step where 3 would do), each paying the handle's and the
replica's fixed per-call CPU. Here calls made in one loop turn with the same `logprob_top_k` are
sent as one call after the turn ends (`call_soon`): a lone stream waits one loop iteration, never
a timer. Full-vocabulary calls (top-k 0, ~200 KB a position) are never shared, and a shared call is
split to stay far below the 4 MiB messages Serve's replica channels accept.

KV affinity is kept: the pools route a call by its routing key (the first sequence's id, see
`serve.kv_affinity_router`) and each replica holds its sequences' KV. A sequence joins a shared
call only once its own key is known to reach the replica that last served it; the shared call
is then routed by such a member's key. Its first call (and any call after it moved) goes alone,
by its own key. Each sequence's queries stay as they were (own prefix, own omitted head).

Failures stay per stream: when a shared call fails for one sequence's sake (INVALID_ARGUMENT, or a
head the replica does not hold), every waiter's call is resent alone and gets its own outcome; a
failure of the pool itself (unavailable, full, past the deadline) goes to every waiter. A waiter
that is cancelled (its timeout, its client left) is dropped; a shared call is cancelled only
when all its waiters are gone. The shared call carries the latest of its waiters' deadlines:
each stream's own deadline is enforced by its caller (`coordinator.fetch`).
Does NOT know Ray or protobuf: `send` does the call and names the replica that answered.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from eft_serve.coordinator.pool_client import routing_key
from eft_serve.engine.types import SequenceQuery, SequenceResult
from eft_serve.errors import InvalidArgument, PrefixUnknown

__all__ = ["CallCoalescer", "Send"]

# send(queries, logprob_top_k, deadline, routing_key) -> (results, id of the replica that answered)
Send = Callable[[Sequence[SequenceQuery], int, float | None, str], Awaitable[tuple[list[SequenceResult], str]]]
# Sequences whose placement is remembered (least recently used forgotten first).
_REMEMBERED = 65536
# Bounds on one shared call, far below the 4 MiB gRPC messages Serve's replicas accept: logprob
# entries answered (positions × (top-k + candidates), ~7 bytes each) and token ids sent.
MAX_SHARED_ANSWER_ENTRIES = 1 << 18
MAX_SHARED_TOKENS = 1 << 18


@dataclass(eq=False)
class _Waiter:
    queries: Sequence[SequenceQuery]
    deadline: float | None
    future: asyncio.Future[list[SequenceResult]]

    @property
    def key(self) -> str:
        """The routing key this call would have alone."""
        return routing_key(self.queries)


def _answer_entries(waiter: _Waiter, top_k: int) -> int:
    return sum(
        q.num_positions * (top_k + len(q.candidate_ids)) + sum(len(c) for c in q.position_candidate_ids)
        for q in waiter.queries
    )


def _sent_tokens(waiter: _Waiter) -> int:
    return sum(len(q.token_ids) - q.known_prefix_length for q in waiter.queries)


def _bounded(group: list[_Waiter], top_k: int) -> list[list[_Waiter]]:
    """`group` split into calls within the shared-call bounds (a waiter over them goes alone)."""
    calls: list[list[_Waiter]] = []
    entries = tokens = 0
    for w in group:
        e, t = _answer_entries(w, top_k), _sent_tokens(w)
        if calls and entries + e <= MAX_SHARED_ANSWER_ENTRIES and tokens + t <= MAX_SHARED_TOKENS:
            calls[-1].append(w)
            entries, tokens = entries + e, tokens + t
        else:
            calls.append([w])
            entries, tokens = e, t
    return calls


class _Placement:
    """Where each sequence's KV lives: the replica that last answered it, and the replica its
    own routing key last reached (a bounded LRU of both)."""

    def __init__(self, limit: int = _REMEMBERED) -> None:
        self._limit = limit
        self._served: OrderedDict[str, str] = OrderedDict()
        self._own: dict[str, str] = {}

    def record(self, sequence_ids: Sequence[str], replica: str, routed_by: str) -> None:
        for s in sequence_ids:
            if s:
                self._served[s] = replica
                self._served.move_to_end(s)
        if routed_by:
            self._own[routed_by] = replica
        while len(self._served) > self._limit:
            gone, _ = self._served.popitem(last=False)
            self._own.pop(gone, None)

    def shared_replica(self, waiter: _Waiter) -> str | None:
        """The replica a shared call may carry this waiter to (None: it must go alone)."""
        key = waiter.key
        replica = self._served.get(key) if key else None
        if replica is None or self._own.get(key) != replica:
            return None
        if any(q.sequence_id and self._served.get(q.sequence_id) != replica for q in waiter.queries):
            return None
        return replica


class CallCoalescer:
    def __init__(self, send: Send, on_send: Callable[[int], None] | None = None) -> None:
        self._send = send
        # Told how many caller calls each sent call carries (metrics).
        self._on_send = on_send
        self._pending: dict[int, list[_Waiter]] = {}
        self._flush_scheduled = False
        self._placement = _Placement()
        self.calls_sent = 0  # calls that left for the pool (tests and observability)
        self.calls_coalesced = 0  # caller calls that rode in a shared call

    async def next_token_logprobs(
        self, queries: Sequence[SequenceQuery], logprob_top_k: int, deadline: float | None
    ) -> list[SequenceResult]:
        loop = asyncio.get_running_loop()
        waiter = _Waiter(queries, deadline, loop.create_future())
        self._pending.setdefault(logprob_top_k, []).append(waiter)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        # Cancelling the caller cancels the future: dropped before sending, or from a shared call.
        return await waiter.future

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        for top_k, waiters in pending.items():
            shared: dict[str, list[_Waiter]] = {}
            for w in waiters:
                if w.future.done():
                    continue
                # Full-vocabulary answers (top-k 0) are large: they never share a call.
                replica = self._placement.shared_replica(w) if top_k > 0 else None
                if replica is None:
                    self._start([w], top_k, w.key)
                else:
                    shared.setdefault(replica, []).append(w)
            for group in shared.values():
                for call in _bounded(group, top_k):
                    # Routed by the first member's own key, which reaches this replica.
                    self._start(call, top_k, call[0].key)

    def _start(self, group: list[_Waiter], top_k: int, routing_key: str) -> None:
        task = asyncio.ensure_future(self._run(group, top_k, routing_key))
        task.add_done_callback(_consume)

    async def _run(self, group: list[_Waiter], top_k: int, routing_key: str) -> None:
        try:
            await self._call(group, top_k, routing_key)
        except BaseException as e:
            # Never leave a caller waiting, whatever went wrong here.
            for w in group:
                if w.future.done():
                    continue
                if isinstance(e, asyncio.CancelledError):
                    w.future.cancel()
                else:
                    w.future.set_exception(e)
            raise

    async def _call(self, group: list[_Waiter], top_k: int, routing_key: str) -> None:
        queries = [q for w in group for q in w.queries]
        deadlines = [w.deadline for w in group]
        deadline = None if any(d is None for d in deadlines) else max(d for d in deadlines if d is not None)
        self.calls_sent += 1
        if len(group) > 1:
            self.calls_coalesced += len(group)
        if self._on_send is not None:
            self._on_send(len(group))
        call = asyncio.ensure_future(self._send(queries, top_k, deadline, routing_key))

        def abandon(_: object) -> None:
            if not call.done() and all(w.future.done() for w in group):
                call.cancel()  # every caller left: stop the pool work too

        for w in group:
            w.future.add_done_callback(abandon)
        try:
            results, replica = await call
        except (InvalidArgument, PrefixUnknown):
            if len(group) == 1:
                raise
            # One bad or moved sequence must not fail the others: each alone, its own outcome.
            for w in group:
                if not w.future.done():
                    self._start([w], top_k, w.key)
            return
        self._placement.record([q.sequence_id for q in queries], replica, routing_key)
        start = 0
        for w in group:
            n = len(w.queries)
            if not w.future.done():
                w.future.set_result(results[start : start + n])
            start += n


def _consume(task: asyncio.Future[None]) -> None:
    # _run hands every failure to its waiters; retrieving it here keeps asyncio from logging
    # "exception was never retrieved" for errors the callers already received.
    if not task.cancelled():
        task.exception()
