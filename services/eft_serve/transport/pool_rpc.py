"""The bodies of the `eft.v1.ModelPool` RPCs over an engine, shared by every pool transport.

Owns request checks that need no model (batch shape), proto conversion and the replica's
sequence memory (so a caller may send only new tokens, see `engine.sequence_memory`); the shared
`EngineRunner` queues calls (coalescing concurrent ones into one engine turn), checks the deadline
and runs the engine off the event loop.
Raises `EftError`s only; the transport's error boundary turns them into statuses.
"""

from __future__ import annotations

from collections.abc import Iterable

from eft_serve.engine.runner import EngineRunner
from eft_serve.engine.sequence_memory import SequenceMemory
from eft_serve.engine.turn_queue import DEFAULT_TURN_POLICY, TurnPolicy
from eft_serve.engine.types import LogprobEngine, kv_sequence_id
from eft_serve.errors import InvalidArgument
from eft_serve.proto_gen.eft.v1 import pool_pb2
from eft_serve.wire.pool_messages import (
    drafted_to_proto,
    drafts_from_proto,
    info_to_proto,
    queries_from_proto,
    results_to_proto,
)


class PoolRpc:
    def __init__(
        self,
        engine: LogprobEngine,
        role: str,
        *,
        batching: TurnPolicy = DEFAULT_TURN_POLICY,
    ) -> None:
        self.engine = engine
        self.role = role
        self._runner = EngineRunner(engine, role, batching=batching)
        # What this replica last saw of each sequence: callers may then send only new tokens.
        self.sequences = SequenceMemory()
        self.tokens_received = 0  # token ids that crossed the wire in NextTokenLogprobs requests

    @property
    def runner(self) -> EngineRunner:
        """The engine queue (its `queue_wait_observer` feeds the pool's queue-wait metric)."""
        return self._runner

    async def next_token_logprobs(
        self, request: pool_pb2.NextTokenLogprobsRequest
    ) -> pool_pb2.NextTokenLogprobsResponse:
        if not request.sequences:
            raise InvalidArgument("NextTokenLogprobs needs at least one sequence")
        self.tokens_received += sum(len(s.token_ids) for s in request.sequences)
        queries = queries_from_proto(request, self.sequences.restore)
        self._check_adapters(q.adapter for q in queries)
        results = await self._runner.next_token_logprobs(queries, request.logprob_top_k, request.deadline_unix_s)
        adapters = self.engine.info.adapters
        for q, sent, r in zip(queries, request.sequences, results):
            self.sequences.remember(kv_sequence_id(q.sequence_id, q.adapter), q.token_ids, sent.omitted_prefix_length)
            if q.adapter:
                r.model_fingerprint = adapters[q.adapter]  # an adapter's answer names its own weights
        return results_to_proto(results, self.engine.info.model_fingerprint)

    async def draft(self, request: pool_pb2.DraftRequest) -> pool_pb2.DraftResponse:
        score_k = request.score_logprob_top_k if request.HasField("score_logprob_top_k") else None
        queries = drafts_from_proto(request)
        self._check_adapters(q.adapter for q in queries)
        drafts = await self._runner.draft(queries, request.deadline_unix_s, score_k)
        return drafted_to_proto(drafts)

    def _check_adapters(self, names: Iterable[str]) -> None:
        served = self.engine.info.adapters
        unknown = sorted({a for a in names if a and a not in served})
        if unknown:
            raise InvalidArgument(
                f"model pool {self.role!r} serves no LoRA adapter {', '.join(map(repr, unknown))}; "
                f"it serves {sorted(served) or 'none'} (pools.<role>.colocate_with)"
            )

    async def check_health(self, timeout_s: float) -> None:
        """Raise `Unavailable` unless a 1-token forward finishes within `timeout_s` (queued fairly)."""
        await self._runner.probe(timeout_s)

    def info(self) -> pool_pb2.ModelInfo:
        return info_to_proto(self.engine.info, self.role)
