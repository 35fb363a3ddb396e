"""An engine in this process, seen through the coordinator's `PoolClient` protocol.

Owns running the synchronous engine off the event loop, one call at a time (a replica's torch
uses one thread), and turning engine `ValueError`s into INVALID_ARGUMENT. No network.
"""

from __future__ import annotations

import asyncio
from typing import Sequence

from eft_serve.engine.types import DraftQuery, LogprobEngine, ModelInfo, SequenceQuery, SequenceResult
from eft_serve.errors import InvalidArgument


class InProcessPool:
    def __init__(self, engine: LogprobEngine, role: str) -> None:
        self.engine = engine
        self.role = role
        self._lock = asyncio.Lock()

    async def info(self) -> ModelInfo:
        return self.engine.info

    async def next_token_logprobs(
        self, queries: Sequence[SequenceQuery], top_k: int, deadline: float | None = None
    ) -> list[SequenceResult]:
        async with self._lock:
            try:
                return await asyncio.to_thread(self.engine.next_token_logprobs, queries, top_k)
            except ValueError as e:
                raise InvalidArgument(f"model pool {self.role!r}: {e}") from None

    async def draft(self, queries: Sequence[DraftQuery]) -> list[list[int]]:
        async with self._lock:
            try:
                return await asyncio.to_thread(self.engine.draft, queries)
            except ValueError as e:
                raise InvalidArgument(f"model pool {self.role!r}: {e}") from None
