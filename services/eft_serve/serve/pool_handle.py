"""`PoolClient` over a Ray Serve deployment handle (coordinator -> pool).

Owns Ray-specific failure mapping: a pool's own `EftError` keeps its status; Serve back-pressure
becomes RESOURCE_EXHAUSTED; a dead or unreachable replica becomes UNAVAILABLE. Calls use Serve's
inter-deployment gRPC transport where available (`_by_reference=False`). Each call names its
sequence as the handle's `session_id`, the key of the pools' KV-affinity router
(`serve/kv_affinity_router.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

from ray import serve
from ray.exceptions import RayActorError, RayError
from ray.serve.exceptions import BackPressureError

from eft_serve.engine.types import DraftedSequence, DraftQuery, ModelInfo, SequenceQuery, SequenceResult
from eft_serve.errors import EftError, ResourceExhausted, Unavailable
from eft_serve.proto_gen.eft.v1 import pool_pb2
from eft_serve.serve.names import POOL_DEPLOYMENT, pool_app_name
from eft_serve.wire.pool_messages import (
    drafted_from_proto,
    drafts_to_proto,
    info_from_proto,
    queries_to_proto,
    results_from_proto,
)


def routing_key(queries: Sequence[SequenceQuery] | Sequence[DraftQuery]) -> str:
    """The sequence a pool call is routed by: its first sequence id ("" = no preference)."""
    return next((q.sequence_id for q in queries if q.sequence_id), "")


class ServePoolClient:
    def __init__(self, role: str, by_reference: bool = False) -> None:
        self.role = role
        handle = serve.get_deployment_handle(POOL_DEPLOYMENT, app_name=pool_app_name(role), _check_exists=False)
        self._handle = handle.options(_by_reference=by_reference)

    def _map(self, e: BaseException) -> EftError:
        # Ray wraps a replica's exception in RayTaskError; the original travels as `.cause`.
        cause = getattr(e, "cause", None)
        if isinstance(cause, EftError):
            return type(cause)(cause.message)
        if isinstance(e, EftError) and hasattr(e, "message"):
            return type(e)(e.message)
        if isinstance(e, BackPressureError):
            return ResourceExhausted(f"model pool {self.role!r} is at capacity (its queue is full); retry with backoff")
        if isinstance(e, (RayActorError, RayError)):
            return Unavailable(f"model pool {self.role!r} is unavailable: {type(e).__name__}")
        return Unavailable(f"model pool {self.role!r} failed: {type(e).__name__}")

    async def info(self) -> ModelInfo:
        try:
            raw = await self._handle.Info.remote()
        except Exception as e:  # noqa: BLE001 - every failure is mapped to a status by _map
            raise self._map(e) from None
        return info_from_proto(pool_pb2.ModelInfo.FromString(raw))

    async def next_token_logprobs(
        self, queries: Sequence[SequenceQuery], logprob_top_k: int, deadline: float | None
    ) -> list[SequenceResult]:
        return results_from_proto(await self.next_token_logprobs_response(queries, logprob_top_k, deadline))

    async def next_token_logprobs_response(
        self, queries: Sequence[SequenceQuery], logprob_top_k: int, deadline: float | None
    ) -> pool_pb2.NextTokenLogprobsResponse:
        """The pool's whole answer, incl. which replica served it (`replica_id`)."""
        request = queries_to_proto(queries, logprob_top_k, deadline).SerializeToString()
        handle = self._handle.options(method_name="NextTokenLogprobs", session_id=routing_key(queries))
        try:
            raw = await handle.remote(request)
        except Exception as e:  # noqa: BLE001 - every failure is mapped to a status by _map
            raise self._map(e) from None
        return pool_pb2.NextTokenLogprobsResponse.FromString(raw)

    async def draft(
        self, queries: Sequence[DraftQuery], deadline: float | None, score_logprob_top_k: int | None = None
    ) -> list[DraftedSequence]:
        request = drafts_to_proto(queries, deadline, score_logprob_top_k).SerializeToString()
        handle = self._handle.options(method_name="Draft", session_id=routing_key(queries))
        try:
            raw = await handle.remote(request)
        except Exception as e:  # noqa: BLE001 - every failure is mapped to a status by _map
            raise self._map(e) from None
        return drafted_from_proto(pool_pb2.DraftResponse.FromString(raw))
