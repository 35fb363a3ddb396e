"""An engine in this process, seen through the coordinator's `PoolClient` protocol.

Owns nothing but the adaptation: the shared `EngineRunner` does the queueing, deadline and
error rules. No network; used by tests, benchmarks and the in-process evaluation reference.
"""

from __future__ import annotations

from collections.abc import Sequence

from eft_serve.engine.runner import EngineRunner
from eft_serve.engine.types import DraftedSequence, DraftQuery, LogprobEngine, ModelInfo, SequenceQuery, SequenceResult


class InProcessPool:
    def __init__(self, engine: LogprobEngine, role: str) -> None:
        self.engine = engine
        self.role = role
        self._runner = EngineRunner(engine, role)

    async def info(self) -> ModelInfo:
        return self._runner.info

    async def next_token_logprobs(
        self, queries: Sequence[SequenceQuery], logprob_top_k: int, deadline: float | None = None
    ) -> list[SequenceResult]:
        return await self._runner.next_token_logprobs(queries, logprob_top_k, deadline)

    async def draft(
        self, queries: Sequence[DraftQuery], deadline: float | None = None, score_logprob_top_k: int | None = None
    ) -> list[DraftedSequence]:
        return await self._runner.draft(queries, deadline, score_logprob_top_k)
