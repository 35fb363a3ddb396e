"""The coordinator's worker pools: what runs where, the tokenizer backlog bound, and its release."""

from __future__ import annotations

import asyncio
import threading

import pytest

from eft_serve.coordinator.workers import (
    INLINE_MAX_CHARS,
    STEP_OFFLOAD_MIN_ENTRIES,
    StepWorkers,
    TokenizerWorkers,
)
from eft_serve.errors import ResourceExhausted


def here() -> int:
    return threading.get_ident()


async def test_short_text_runs_inline_long_text_on_a_thread() -> None:
    workers = TokenizerWorkers(1, 10 * INLINE_MAX_CHARS)
    loop_thread = here()
    assert await workers.run(INLINE_MAX_CHARS, here) == loop_thread
    assert await workers.run(INLINE_MAX_CHARS + 1, here) != loop_thread
    assert workers.backlog_chars == 0
    workers.close()
    # Closed pools start again on next use (a coordinator stopped and started again).
    assert await workers.run(INLINE_MAX_CHARS + 1, here) != loop_thread
    workers.close()
    assert await TokenizerWorkers(0, 1).run(10**6, here) == loop_thread  # 0 workers: on the loop


async def test_backlog_refuses_beyond_the_limit_and_is_released_when_work_ends() -> None:
    workers = TokenizerWorkers(1, 6000)
    gate = threading.Event()
    first = asyncio.create_task(workers.run(4000, gate.wait, 5))
    await asyncio.sleep(0.05)
    assert workers.backlog_chars == 4000
    with pytest.raises(ResourceExhausted, match="already tokenizing 4000 characters"):
        await workers.run(2500, here)
    # Queued behind the first (one thread) and cancelled before it starts: released at once.
    queued = asyncio.create_task(workers.run(1500, here))
    await asyncio.sleep(0.02)
    assert workers.backlog_chars == 5500
    queued.cancel()
    await asyncio.gather(queued, return_exceptions=True)
    assert workers.backlog_chars == 4000
    # The running one is cancelled by its caller, but it holds its thread until it ends: still counted.
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    assert workers.backlog_chars == 4000
    gate.set()
    for _ in range(100):
        if workers.backlog_chars == 0:
            break
        await asyncio.sleep(0.01)
    assert workers.backlog_chars == 0
    # Alone, a request over the whole limit is still admitted (its size is bounded by validation).
    assert await workers.run(9000, here) != here()
    workers.close()


async def test_errors_raise_to_the_caller() -> None:
    workers = TokenizerWorkers(1, 10**6)

    def boom() -> None:
        raise ValueError("bad prompt")

    with pytest.raises(ValueError, match="bad prompt"):
        await workers.run(INLINE_MAX_CHARS + 1, boom)
    assert workers.backlog_chars == 0
    workers.close()


async def test_steps_leave_the_loop_only_when_large() -> None:
    steps = StepWorkers(2)
    loop_thread = here()
    assert await steps.run(STEP_OFFLOAD_MIN_ENTRIES - 1, here) == loop_thread
    assert await steps.run(STEP_OFFLOAD_MIN_ENTRIES, here) != loop_thread
    assert await StepWorkers(0).run(10**9, here) == loop_thread
    steps.close()
