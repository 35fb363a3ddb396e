"""`PoolClient` over a Ray Serve deployment handle (coordinator -> pool).

Owns Ray-specific failure mapping: a pool's own `EftError` keeps its status; Serve back-pressure
becomes RESOURCE_EXHAUSTED; a dead or unreachable replica becomes UNAVAILABLE (`PoolUnreachable`,
the one failure the coordinator retries). Owns cancellation too: awaiting a Serve response and
being cancelled does not stop the call in Serve, so a cancelled caller (its timeout, a failed
sibling call, a client that went away) cancels the `DeploymentResponse` — Serve then drops it
from the replica's queue or raises CancelledError in the replica method, so the engine never
starts it (`engine.runner`). Calls use Serve's
inter-deployment gRPC transport where available (`_by_reference=False`). Each call names its
sequence as the handle's `session_id`, the key of the pools' KV-affinity router
(`serve/kv_affinity_router.py`). Concurrent streams' `NextTokenLogprobs` calls are coalesced into
one call per replica per loop turn (`coordinator.call_coalescer`, `coordinator.coalesce_pool_calls`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from ray import serve
from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, RayError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError

from eft_serve.coordinator.call_coalescer import CallCoalescer
from eft_serve.coordinator.pool_client import routing_key
from eft_serve.engine.types import DraftedSequence, DraftQuery, ModelInfo, SequenceQuery, SequenceResult
from eft_serve.errors import EftError, PoolUnreachable, ResourceExhausted, Unavailable
from eft_serve.proto_gen.eft.v1 import pool_pb2
from eft_serve.serve.names import POOL_DEPLOYMENT, pool_app_name
from eft_serve.wire.pool_messages import (
    drafted_from_proto,
    drafts_to_proto,
    info_from_proto,
    queries_to_proto,
    results_from_proto,
)


class ServePoolClient:
    def __init__(
        self,
        role: str,
        by_reference: bool = False,
        coalesce: bool = True,
        on_send: Callable[[int], None] | None = None,
    ) -> None:
        self.role = role
        handle = serve.get_deployment_handle(POOL_DEPLOYMENT, app_name=pool_app_name(role), _check_exists=False)
        self._handle = handle.options(_by_reference=by_reference)
        # Concurrent streams' calls of one loop turn leave as one call per replica (KV affinity kept).
        # `on_send(n)`: a call left carrying n streams' calls (metrics).
        self.coalescer = CallCoalescer(self._send, on_send) if coalesce else None

    def _map(self, e: BaseException) -> EftError:
        # Ray wraps a replica's exception in RayTaskError; the original travels as `.cause`.
        cause = getattr(e, "cause", None)
        if isinstance(cause, EftError):
            return type(cause)(cause.message)
        if isinstance(e, EftError) and hasattr(e, "message"):
            return type(e)(e.message)
        if isinstance(e, BackPressureError):
            return ResourceExhausted(f"model pool {self.role!r} is at capacity (its queue is full); retry with backoff")
        # The replica's process or node died, or cannot be reached: another replica can answer.
        if isinstance(e, (RayActorError, WorkerCrashedError, NodeDiedError, ObjectLostError)):
            return PoolUnreachable(f"model pool {self.role!r} is unavailable: {type(e).__name__}")
        if isinstance(e, RayError):
            return Unavailable(f"model pool {self.role!r} is unavailable: {type(e).__name__}")
        return Unavailable(f"model pool {self.role!r} failed: {type(e).__name__}")

    async def _result(self, response: Any) -> Any:
        """The call's result; a cancelled caller cancels the call in Serve as well."""
        try:
            return await response
        except asyncio.CancelledError:
            response.cancel()  # best effort: unassigned calls are dropped, running ones cancelled
            raise
        except Exception as e:  # noqa: BLE001 - every failure is mapped to a status by _map
            raise self._map(e) from None

    async def info(self) -> ModelInfo:
        raw = await self._result(self._handle.Info.remote())
        return info_from_proto(pool_pb2.ModelInfo.FromString(raw))

    async def next_token_logprobs(
        self, queries: Sequence[SequenceQuery], logprob_top_k: int, deadline: float | None
    ) -> list[SequenceResult]:
        if self.coalescer is not None:
            return await self.coalescer.next_token_logprobs(queries, logprob_top_k, deadline)
        return results_from_proto(await self.next_token_logprobs_response(queries, logprob_top_k, deadline))

    async def next_token_logprobs_response(
        self,
        queries: Sequence[SequenceQuery],
        logprob_top_k: int,
        deadline: float | None,
        route_by: str | None = None,
    ) -> pool_pb2.NextTokenLogprobsResponse:
        """The pool's whole answer, incl. which replica served it (`replica_id`); routed by
        `route_by` (default: the first sequence's id)."""
        request = queries_to_proto(queries, logprob_top_k, deadline).SerializeToString()
        key = routing_key(queries) if route_by is None else route_by
        handle = self._handle.options(method_name="NextTokenLogprobs", session_id=key)
        raw = await self._result(handle.remote(request))
        return pool_pb2.NextTokenLogprobsResponse.FromString(raw)

    async def _send(
        self, queries: Sequence[SequenceQuery], logprob_top_k: int, deadline: float | None, route_by: str
    ) -> tuple[list[SequenceResult], str]:
        reply = await self.next_token_logprobs_response(queries, logprob_top_k, deadline, route_by)
        return results_from_proto(reply), reply.replica_id

    async def draft(
        self, queries: Sequence[DraftQuery], deadline: float | None, score_logprob_top_k: int | None = None
    ) -> list[DraftedSequence]:
        request = drafts_to_proto(queries, deadline, score_logprob_top_k).SerializeToString()
        handle = self._handle.options(method_name="Draft", session_id=routing_key(queries))
        raw = await self._result(handle.remote(request))
        return drafted_from_proto(pool_pb2.DraftResponse.FromString(raw))
