"""EngineRunner: an engine that schedules concurrent calls itself (vLLM) gets them side by side;
any other engine gets one call at a time (torch threads and the KV cache are shared)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import pytest

from eft_serve.engine.runner import EngineRunner
from eft_serve.engine.types import SequenceQuery, SequenceResult
from eft_serve.errors import DeadlineExceeded, InvalidArgument
from eft_serve.testing.fake_engine import FakeEngine


class OverlapProbe(FakeEngine):
    """A fake model whose calls record how many run at once (each lingers briefly)."""

    def __init__(self, concurrent: bool) -> None:
        super().__init__(vocab_size=32)
        self.schedules_concurrent_calls = concurrent
        self.active = 0
        self.max_active = 0
        self._guard = threading.Lock()

    def next_token_logprobs(self, queries: Sequence[SequenceQuery], logprob_top_k: int) -> list[SequenceResult]:
        with self._guard:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            threading.Event().wait(0.2)
            return super().next_token_logprobs(queries, logprob_top_k)
        finally:
            with self._guard:
                self.active -= 1


@pytest.mark.parametrize("concurrent, expected_overlap", [(True, 8), (False, 1)])
async def test_calls_overlap_only_for_engines_that_schedule_them(concurrent: bool, expected_overlap: int) -> None:
    engine = OverlapProbe(concurrent)
    runner = EngineRunner(engine, "probe")
    queries = [SequenceQuery(token_ids=[1, 2, i]) for i in range(8)]
    results = await asyncio.gather(*(runner.next_token_logprobs([q], 4) for q in queries))
    assert engine.max_active == expected_overlap
    # Same answers either way: concurrency changes scheduling, not results.
    assert [r[0].positions[0].top_ids.tolist() for r in results] == [
        engine.next_token_logprobs([q], 4)[0].positions[0].top_ids.tolist() for q in queries
    ]


async def test_concurrent_path_keeps_deadline_and_error_mapping() -> None:
    runner = EngineRunner(OverlapProbe(True), "probe")
    with pytest.raises(DeadlineExceeded):
        await runner.next_token_logprobs([SequenceQuery(token_ids=[1])], 4, deadline=time.time() - 1)
    with pytest.raises(InvalidArgument, match="probe"):
        await runner.next_token_logprobs([SequenceQuery(token_ids=[10_000])], 4)
