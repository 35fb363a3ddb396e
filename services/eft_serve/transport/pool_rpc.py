"""The bodies of the `eft.v1.ModelPool` RPCs over an engine, shared by every pool transport.

Owns request checks that need no model (deadline, batch shape), running the engine off the
event loop one call at a time, and proto conversion. Raises `EftError`s only.
"""

from __future__ import annotations

import asyncio
import time

from eft_serve.engine.types import LogprobEngine
from eft_serve.errors import DeadlineExceeded, InvalidArgument
from eft_serve.proto_gen.eft.v1 import pool_pb2
from eft_serve.transport.convert import drafts_from_proto, info_to_proto, queries_from_proto, results_to_proto


class PoolRpc:
    def __init__(self, engine: LogprobEngine, role: str) -> None:
        self.engine = engine
        self.role = role
        # One engine call at a time: torch runs one thread per replica and the KV cache is shared.
        self._lock = asyncio.Lock()

    def _check_deadline(self, deadline: float) -> None:
        if deadline and time.time() > deadline:
            raise DeadlineExceeded(f"model pool {self.role!r}: the request's deadline passed before it was served")

    async def next_token_logprobs(self, request: pool_pb2.NextTokenLogprobsRequest) -> pool_pb2.NextTokenLogprobsResponse:
        if not request.sequences:
            raise InvalidArgument("NextTokenLogprobs needs at least one sequence")
        queries = queries_from_proto(request)
        async with self._lock:
            self._check_deadline(request.deadline_unix_s)
            try:
                results = await asyncio.to_thread(self.engine.next_token_logprobs, queries, request.top_k)
            except ValueError as e:
                raise InvalidArgument(f"model pool {self.role!r}: {e}") from None
        return results_to_proto(results, self.engine.info.model_fingerprint)

    async def draft(self, request: pool_pb2.DraftRequest) -> pool_pb2.DraftResponse:
        queries = drafts_from_proto(request)
        async with self._lock:
            self._check_deadline(request.deadline_unix_s)
            try:
                drafts = await asyncio.to_thread(self.engine.draft, queries)
            except ValueError as e:
                raise InvalidArgument(f"model pool {self.role!r}: {e}") from None
        return pool_pb2.DraftResponse(sequences=[pool_pb2.DraftSequence(token_ids=d) for d in drafts])

    def info(self) -> pool_pb2.ModelInfo:
        return info_to_proto(self.engine.info, self.role)
