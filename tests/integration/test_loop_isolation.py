"""The coordinator's event loop keeps streaming while a long prompt is tokenized or a full-vocabulary step merges.

A tokenizer whose long encodes take 500 ms (sleeping, so the GIL is free as in HF's Rust
tokenizers) stands in for a 256 KiB prompt; a task ticking every 5 ms measures the longest loop
stall. Tokenizing on the loop stalls it for the whole 500 ms; off the loop the stall stays far
below (the bound leaves room for a noisy 2-core machine).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from eft_serve.config import CoordinatorConfig
from eft_serve.coordinator import decode as decode_module
from eft_serve.coordinator.request import ChatMessage, GenerationRequest, MergeOptions
from eft_serve.coordinator.service import EftCoordinator
from eft_serve.coordinator.workers import INLINE_MAX_CHARS
from eft_serve.errors import InvalidArgument, ResourceExhausted
from eft_serve.transport.inprocess import InProcessPool

from fakes import EOS, RECIPES, CharTokenizer, fake_engines

ENCODE_S = 0.5
MAX_STALL_S = 0.25  # half the encode (on the loop the stall is >= ENCODE_S): room for a loaded machine
LONG = "a" * (4 * INLINE_MAX_CHARS)  # also over the fakes' 96-token context: refused once encoded


class SlowTokenizer(CharTokenizer):
    """Encodes long text slowly, like a BPE tokenizer over a 256 KiB prompt; notes where it ran."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []  # (characters, thread id) of every encode
        self.active = 0

    @property
    def threads(self) -> list[int]:
        return [thread for _, thread in self.calls]

    def encode(self, text: str) -> list[int]:
        self.calls.append((len(text), threading.get_ident()))
        if len(text) > INLINE_MAX_CHARS:
            self.active += 1
            time.sleep(ENCODE_S)  # releases the GIL, as `encode_batch` does in Rust
            self.active -= 1
        return super().encode(text)


class WideTokenizer(CharTokenizer):
    """Decodes any id (for a fake vocabulary wider than the characters)."""

    def decode(
        self, ids: Sequence[int], skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool = False
    ) -> str:
        return super().decode([i % EOS for i in ids])


class LoopLag:
    """While entered: a task ticking every 5 ms; `max_stall_s` is the longest extra wait seen."""

    def __init__(self) -> None:
        self.max_stall_s = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            self.max_stall_s = max(self.max_stall_s, now - last - 0.005)
            last = now

    async def __aenter__(self) -> LoopLag:
        self._task = asyncio.create_task(self._tick())
        await asyncio.sleep(0.02)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        await asyncio.sleep(0.02)  # let it see the gap that just ended
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def slow_coordinator(tok: Any, vocab: int = EOS + 1, **cfg: Any) -> EftCoordinator:
    pools = {role: InProcessPool(e, role) for role, e in fake_engines(vocab).items()}
    return EftCoordinator(pools, RECIPES, tok, CoordinatorConfig(max_new_tokens_cap=64, **cfg))


async def tokens_of(coord: EftCoordinator, req: GenerationRequest) -> list[int]:
    stream = await coord.generate(req)
    return [t.token_id for chunk in [c async for c in stream] for t in chunk.tokens]


async def test_long_prompt_is_tokenized_off_the_loop_while_others_stream() -> None:
    tok = SlowTokenizer()
    coord = slow_coordinator(tok)
    await coord.start()
    short = GenerationRequest(prompt="hello", temperature=0, max_new_tokens=32, ignore_eos=True)
    async with LoopLag() as lag:
        streaming = asyncio.create_task(tokens_of(coord, short))
        # Refused for the models' context once encoded: the error still raises from generate().
        with pytest.raises(InvalidArgument, match="context length"):
            await coord.generate(GenerationRequest(prompt=LONG, max_new_tokens=4))
        assert len(await streaming) == 32
    await coord.stop()
    loop_thread = threading.get_ident()
    assert dict(tok.calls) == {len("hello"): loop_thread, len(LONG): dict(tok.calls)[len(LONG)]}
    assert dict(tok.calls)[len(LONG)] != loop_thread  # the long prompt went to a tokenizer thread
    assert lag.max_stall_s < MAX_STALL_S, f"the event loop stalled {lag.max_stall_s * 1000:.0f} ms"


async def test_tokenizing_on_the_loop_is_what_the_probe_catches() -> None:
    # The same probe with tokenizer_workers = 0 (tokenizing on the loop): it must see the stall,
    # or the test above would pass whatever the coordinator did.
    coord = slow_coordinator(SlowTokenizer(), tokenizer_workers=0)
    await coord.start()
    async with LoopLag() as lag:
        with pytest.raises(InvalidArgument, match="context length"):
            await coord.generate(GenerationRequest(prompt=LONG, max_new_tokens=4))
    assert lag.max_stall_s >= ENCODE_S * 0.9


async def test_chat_is_rendered_off_the_loop() -> None:
    tok = SlowTokenizer()
    coord = slow_coordinator(tok)
    await coord.start()
    req = GenerationRequest(prompt="", messages=(ChatMessage("user", "hi"),), temperature=0, max_new_tokens=3)
    assert len(await tokens_of(coord, req)) == 3
    assert tok.threads and threading.get_ident() not in tok.threads


async def test_tokenizer_backlog_is_bounded_and_released() -> None:
    tok = SlowTokenizer()
    coord = slow_coordinator(tok, tokenizer_backlog_chars=len(LONG) + 100)
    await coord.start()
    first = asyncio.create_task(coord.generate(GenerationRequest(prompt=LONG, max_new_tokens=4)))
    for _ in range(400):  # bounded: on the loop the encode would be over before this runs
        if tok.active:
            break
        await asyncio.sleep(0.005)
    assert tok.active, "the long prompt is not being tokenized on a worker thread"
    with pytest.raises(ResourceExhausted, match="already tokenizing"):
        await coord.generate(GenerationRequest(prompt=LONG, max_new_tokens=4))
    # Short prompts never wait for the pool (and never count against it).
    assert len(await tokens_of(coord, GenerationRequest(prompt="ab", max_new_tokens=2, ignore_eos=True))) == 2
    with pytest.raises(InvalidArgument, match="context length"):
        await first
    # Once the first is done, the same request is admitted again (and tokenized: context error).
    with pytest.raises(InvalidArgument, match="context length"):
        await coord.generate(GenerationRequest(prompt=LONG, max_new_tokens=4))


async def test_full_vocabulary_steps_merge_off_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[int] = []
    real_merge = decode_module.merge_position

    def recording_merge(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.get_ident())
        return real_merge(*args, **kwargs)

    monkeypatch.setattr(decode_module, "merge_position", recording_merge)
    exact = MergeOptions(logprob_top_k=0)

    def req(merge: MergeOptions, seed: int | None = None) -> GenerationRequest:
        return GenerationRequest(
            prompt="abc", merge=merge, temperature=1.0 if seed else 0, seed=seed, max_new_tokens=8, ignore_eos=True
        )

    loop_thread = threading.get_ident()
    results: dict[int, list[list[int]]] = {}
    for workers in (0, 2):
        coord = slow_coordinator(WideTokenizer(), vocab=4096, merge_workers=workers)
        await coord.start()
        threads.clear()
        results[workers] = [await tokens_of(coord, req(exact)), await tokens_of(coord, req(exact, seed=5))]
        exact_threads = list(threads)
        threads.clear()
        await tokens_of(coord, req(MergeOptions(logprob_top_k=5)))  # 15 tokens of support: inline
        topk_threads = list(threads)
        await coord.stop()
        if workers == 0:
            assert set(exact_threads) == {loop_thread}
        else:
            assert exact_threads and loop_thread not in exact_threads
        assert set(topk_threads) == {loop_thread}
    # Where the merge ran changes nothing: greedy and seeded sampling give the same tokens.
    assert results[0] == results[2]
