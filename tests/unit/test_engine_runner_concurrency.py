"""EngineRunner: an engine that schedules concurrent calls itself (vLLM) gets them side by side;
any other engine gets one call at a time (torch threads and the KV cache are shared)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import pytest

from eft_serve.engine.runner import EngineRunner
from eft_serve.engine.turn_queue import TurnPolicy
from eft_serve.engine.types import DraftQuery, SequenceQuery, SequenceResult
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


# --- continuous batching: calls waiting when the engine frees share its next turn ---------------


def _answers(engine: FakeEngine, queries: list[SequenceQuery], k: int) -> list[list[int]]:
    return [engine.next_token_logprobs([q], k)[0].positions[0].top_ids.tolist() for q in queries]


async def _behind_a_running_call(runner: EngineRunner, calls: list) -> list:
    """Start one call, let it reach the engine, then queue `calls` (coroutines) behind it."""
    first = asyncio.ensure_future(runner.next_token_logprobs([SequenceQuery(token_ids=[7, 7])], 4))
    await asyncio.sleep(0.05)
    queued = [asyncio.ensure_future(c) for c in calls]
    await first
    return await asyncio.gather(*queued, return_exceptions=True)


async def test_calls_waiting_for_the_engine_share_its_next_turn() -> None:
    engine = FakeEngine(32, seed=3, delay_s=0.2)
    runner = EngineRunner(engine, "probe")
    queries = [SequenceQuery(token_ids=[1, 2, i]) for i in range(7)]
    results = await _behind_a_running_call(runner, [runner.next_token_logprobs([q], 4) for q in queries])
    # One turn for the running call, ONE for the seven that waited (not seven).
    assert engine.num_calls == 2 and (runner.turns.turns, runner.turns.calls) == (2, 8)
    engine.delay_s = 0.0
    assert [r[0].positions[0].top_ids.tolist() for r in results] == _answers(engine, queries, 4)


async def test_a_turn_holds_at_most_max_batch_calls_and_only_one_top_k() -> None:
    engine = FakeEngine(32, seed=3, delay_s=0.1)
    runner = EngineRunner(engine, "probe", batching=TurnPolicy(max_calls=3))
    calls = [runner.next_token_logprobs([SequenceQuery(token_ids=[1, i])], 4) for i in range(7)]
    calls.append(runner.next_token_logprobs([SequenceQuery(token_ids=[1, 9])], 5))
    results = await _behind_a_running_call(runner, calls)
    assert not [r for r in results if isinstance(r, BaseException)]
    # 1 running + top_k 4: 3 + 3 + 1 + top_k 5: 1.
    assert runner.turns.turns == 5


async def test_a_bad_call_in_a_shared_turn_fails_alone() -> None:
    engine = FakeEngine(32, seed=3, delay_s=0.1)
    runner = EngineRunner(engine, "probe")
    good = [SequenceQuery(token_ids=[1, i]) for i in range(3)]
    calls = [runner.next_token_logprobs([q], 4) for q in good[:2]]
    calls.append(runner.next_token_logprobs([SequenceQuery(token_ids=[10_000])], 4))  # not in the vocabulary
    calls.append(runner.next_token_logprobs([good[2]], 4))
    calls.append(runner.next_token_logprobs([good[0]], 4, deadline=time.time() + 0.01))  # expires while queued
    results = await _behind_a_running_call(runner, calls)
    assert isinstance(results[2], InvalidArgument) and "probe" in str(results[2])
    assert isinstance(results[4], DeadlineExceeded)
    engine.delay_s = 0.0
    ok = [results[0], results[1], results[3]]
    assert [r[0].positions[0].top_ids.tolist() for r in ok] == _answers(engine, good, 4)


async def test_drafts_keep_their_place_in_line_and_run_alone() -> None:
    engine = FakeEngine(32, seed=3, delay_s=0.1)
    runner = EngineRunner(engine, "probe")
    calls = [
        runner.next_token_logprobs([SequenceQuery(token_ids=[1, 2])], 4),
        runner.draft([DraftQuery(token_ids=[1, 2], num_tokens=3)]),
        runner.next_token_logprobs([SequenceQuery(token_ids=[1, 3])], 4),
    ]
    results = await _behind_a_running_call(runner, calls)
    assert len(results[1][0].token_ids) == 3
    # running call, then the two logprobs calls together (a later call may join an earlier
    # turn), then the draft alone.
    assert runner.turns.turns == 3


async def _lockstep_streams(runner: EngineRunner, streams: int, steps: int) -> None:
    """`streams` sequences decoding together; stream i comes back i x 8 ms after each answer
    (its merge and round trip), as streams do behind a coordinator."""

    async def stream(i: int) -> None:
        tokens = [1, i]
        for _ in range(steps):
            await runner.next_token_logprobs([SequenceQuery(token_ids=tokens, sequence_id=f"s{i}")], 4)
            tokens.append(2)
            await asyncio.sleep(0.008 * i)

    await asyncio.gather(*(stream(i) for i in range(streams)))


async def test_sequences_decoding_together_are_waited_for_and_share_turns() -> None:
    alone = EngineRunner(FakeEngine(32, seed=3, delay_s=0.03), "probe", batching=TurnPolicy(wait_s=0.0))
    await _lockstep_streams(alone, streams=4, steps=8)
    waiting = EngineRunner(FakeEngine(32, seed=3, delay_s=0.03), "probe", batching=TurnPolicy(wait_s=0.05))
    await _lockstep_streams(waiting, streams=4, steps=8)
    # Without waiting, stragglers miss each turn and run in the next (more, smaller turns); with
    # it, once every stream has been seen twice a step is one turn of all four.
    assert waiting.turns.turns <= 8 + 3
    assert alone.turns.turns >= waiting.turns.turns + 3
    assert waiting.turns.calls == alone.turns.calls == 32


async def test_a_single_stream_never_waits_for_companions() -> None:
    runner = EngineRunner(FakeEngine(32, seed=3), "probe", batching=TurnPolicy(wait_s=5.0))
    started = time.perf_counter()
    await _lockstep_streams(runner, streams=1, steps=6)
    assert time.perf_counter() - started < 2.0  # a wait would cost 5 s a step


def test_pool_rpc_hands_its_batching_settings_to_the_engine_queue() -> None:
    from eft_serve.transport.pool_rpc import PoolRpc

    policy = TurnPolicy(max_calls=5, wait_s=0.03, max_prefill_tokens=64)
    assert PoolRpc(FakeEngine(32), "probe", batching=policy).runner.turns.policy is policy
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        TurnPolicy(max_prefill_tokens=4)
    with pytest.raises(ValueError, match="max_calls"):
        TurnPolicy(max_calls=0)


def test_engines_declare_their_optional_capabilities_on_the_contract() -> None:
    # Every engine inherits the contract's defaults and overrides only what it does differently:
    # the HF engine keeps KV per sequence (admission, chunked prefill), vLLM schedules its own calls.
    from eft_serve.engine.hf_engine import HFEngine
    from eft_serve.engine.types import FITS, EngineBase
    from eft_serve.engine.vllm_engine import VLLMEngine

    fake = FakeEngine(vocab_size=8)
    assert isinstance(fake, EngineBase)
    assert fake.admit([("s", 10_000)]) is FITS
    assert fake.uncached_tokens(SequenceQuery(token_ids=[1, 2, 3], sequence_id="s")) is None
    assert fake.schedules_concurrent_calls is False
    assert issubclass(HFEngine, EngineBase) and issubclass(VLLMEngine, EngineBase)
    assert HFEngine.admit is not EngineBase.admit and HFEngine.uncached_tokens is not EngineBase.uncached_tokens
    assert HFEngine.schedules_concurrent_calls is False
    assert VLLMEngine.schedules_concurrent_calls is True and VLLMEngine.admit is EngineBase.admit
