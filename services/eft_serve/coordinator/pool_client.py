"""The coordinator's view of a model pool, whatever carries the call.

Owns only the protocol. Implementations: `transport.inprocess.InProcessPool` (an engine in this
process), `transport.grpc_pool.GrpcPoolClient` (plain gRPC), `serve.pool_handle.ServePoolClient`
(Ray Serve handle). Implementations raise `eft_serve.errors.EftError` subclasses only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from eft_serve.engine.types import DraftedSequence, DraftQuery, ModelInfo, SequenceQuery, SequenceResult


def routing_key(queries: Sequence[SequenceQuery] | Sequence[DraftQuery]) -> str:
    """The sequence a pool call is routed by: its first sequence id ("" = no preference)."""
    return next((q.sequence_id for q in queries if q.sequence_id), "")


class PoolClient(Protocol):
    role: str

    async def info(self) -> ModelInfo: ...

    async def next_token_logprobs(
        self, queries: Sequence[SequenceQuery], logprob_top_k: int, deadline: float | None
    ) -> list[SequenceResult]: ...

    async def draft(
        self, queries: Sequence[DraftQuery], deadline: float | None, score_logprob_top_k: int | None = None
    ) -> list[DraftedSequence]:
        """Greedy drafts; with `score_logprob_top_k` each comes with the drafter's own scores."""
        ...
