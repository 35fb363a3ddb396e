"""The coordinator's view of a model pool, whatever carries the call.

Owns the protocol and `ColocatedRole` (a role whose LoRA adapter is served inside another pool).
Implementations: `transport.inprocess.InProcessPool` (an engine in this
process), `testing.grpc_pool.GrpcPoolClient` (plain gRPC, tests), `serve.pool_handle.ServePoolClient`
(Ray Serve handle). Implementations raise `eft_serve.errors.EftError` subclasses only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol, TypeVar

from eft_serve.engine.types import DraftedSequence, DraftQuery, ModelInfo, SequenceQuery, SequenceResult
from eft_serve.errors import FailedPrecondition

Q = TypeVar("Q", SequenceQuery, DraftQuery)


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


class ColocatedRole:
    """A recipe role served inside another pool: the LoRA adapter `adapter` of `host`'s model.

    Its identity is the host's, renamed, with the adapter's weights fingerprint (so result-cache
    keys and the answer checks name base + adapter, never the base); its calls are the host's
    calls with every sequence tagged by the adapter. `StepFetcher` sends the queries of every role
    of one host in one call (`route`): co-located up-scaling costs 2 pool calls a token, not 3.
    """

    def __init__(self, role: str, host: PoolClient, adapter: str | None = None) -> None:
        self.role = role
        self.host = host
        self.adapter = adapter or role

    async def info(self) -> ModelInfo:
        base = await self.host.info()
        fingerprint = base.adapters.get(self.adapter)
        if fingerprint is None:
            raise FailedPrecondition(
                f"pool {self.host.role!r} does not serve the LoRA adapter {self.adapter!r} of role {self.role!r} "
                f"(it serves {sorted(base.adapters) or 'none'}); check pools.{self.role}.colocate_with"
            )
        return dataclasses.replace(
            base, name=f"{self.role}:lora@{base.name}", model_fingerprint=fingerprint, adapters={}
        )

    def tag(self, queries: Sequence[Q]) -> list[Q]:
        return [dataclasses.replace(q, adapter=self.adapter) for q in queries]

    async def next_token_logprobs(
        self, queries: Sequence[SequenceQuery], logprob_top_k: int, deadline: float | None
    ) -> list[SequenceResult]:
        return await self.host.next_token_logprobs(self.tag(queries), logprob_top_k, deadline)

    async def draft(
        self, queries: Sequence[DraftQuery], deadline: float | None, score_logprob_top_k: int | None = None
    ) -> list[DraftedSequence]:
        return await self.host.draft(self.tag(queries), deadline, score_logprob_top_k)


def route(client: PoolClient) -> tuple[PoolClient, str]:
    """The client that carries `client`'s calls and the adapter they are tagged with ("": none)."""
    if isinstance(client, ColocatedRole):
        return client.host, client.adapter
    return client, ""
