"""Worker threads for the coordinator's per-request CPU work, so its event loop only streams.

Owns two small thread pools and the rule for what leaves the loop (docs/latency-isolation.md):

* `TokenizerWorkers`: request validation whenever it tokenizes more than a short plain prompt
  (prompt encoding, chat rendering for every model of the recipe). Encoding a long prompt takes
  far longer than a token's step, and transformers' fast tokenizers encode through `encode_batch`,
  which releases the GIL in Rust, so a thread takes it off the loop. The backlog is bounded in
  characters of text: a request that would push it over the limit is refused RESOURCE_EXHAUSTED
  at once instead of queueing behind seconds of tokenizing.
* `StepWorkers`: a decoding step's merge and sampling when they touch many tokens (exact mode over
  a real vocabulary: merging and top-p sampling a 150k-token support takes milliseconds, which
  would hold every other stream). A top-k step stays on the loop: it is about as cheap as the
  thread hop itself.

With 0 workers a pool runs its work inline, on the loop (the benchmark's comparison case).
Figures: docs/latency-isolation.md. Knows nothing of requests, plans or tokenizers: callers hand
in a callable and its size.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from eft_serve.errors import ResourceExhausted

T = TypeVar("T")

# Text this short is tokenized on the loop: it encodes in well under a millisecond, less than
# waiting behind a long prompt in the pool would cost it.
INLINE_MAX_CHARS = 1024
# What a chat request weighs beyond its text: a Jinja render per model of the recipe, so every
# chat request is rendered off the loop.
CHAT_RENDER_CHARS = INLINE_MAX_CHARS
# A step touching at least this many (support token x position) entries is merged and sampled
# off the loop: below it (the default top-20 and anything up to a few hundred per model) a merge
# costs about what the thread hop does; above it the cost grows with the support.
STEP_OFFLOAD_MIN_ENTRIES = 2048


class _Threads:
    """A lazily started ThreadPoolExecutor (closed by `close`, started again on next use)."""

    def __init__(self, workers: int, name: str) -> None:
        self.workers = workers
        self._name = name
        self._executor: ThreadPoolExecutor | None = None

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix=self._name)
        return self._executor.submit(fn)

    def close(self) -> None:
        if self._executor is not None:
            # Queued work is dropped (its awaiting requests are being torn down); running work ends on its own.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


class TokenizerWorkers:
    """Runs request validation (tokenizing, chat rendering) off the loop, with a bounded backlog."""

    def __init__(self, workers: int, max_backlog_chars: int) -> None:
        self._threads = _Threads(workers, "eft-tokenize")
        self._max_backlog = max_backlog_chars
        self._lock = threading.Lock()  # the backlog shrinks in worker threads (done callbacks)
        self._backlog = 0

    @property
    def backlog_chars(self) -> int:
        """Characters of text submitted and not yet tokenized (observability, tests)."""
        return self._backlog

    async def run(self, chars: int, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` on a tokenizer thread (inline when `chars` is short or there are no workers).

        RESOURCE_EXHAUSTED when the work already submitted plus `chars` exceeds the backlog limit;
        a request alone is always admitted, however long (its size is bounded by validation).
        """
        if self._threads.workers == 0 or chars <= INLINE_MAX_CHARS:
            return fn(*args)
        with self._lock:
            if self._backlog and self._backlog + chars > self._max_backlog:
                raise ResourceExhausted(
                    f"this coordinator replica is already tokenizing {self._backlog} characters of prompts "
                    f"(its limit is {self._max_backlog}); retry with backoff (another replica may be free)"
                )
            self._backlog += chars
        try:
            future = self._threads.submit(functools.partial(fn, *args))
        except BaseException:
            self._release(chars)
            raise
        # Released when the work really ends: a cancelled request's encode that already started
        # still occupies a thread until it finishes, and counts until then.
        future.add_done_callback(lambda _f: self._release(chars))
        return await asyncio.wrap_future(future)

    def _release(self, chars: int) -> None:
        with self._lock:
            self._backlog -= chars

    def close(self) -> None:
        self._threads.close()


class StepWorkers:
    """Runs one decoding step's merge or sampling off the loop when it touches many tokens."""

    def __init__(self, workers: int) -> None:
        self._threads = _Threads(workers, "eft-merge")

    def offloads(self, entries: int) -> bool:
        return self._threads.workers > 0 and entries >= STEP_OFFLOAD_MIN_ENTRIES

    async def run(self, entries: int, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)`, on a worker thread when `entries` (support tokens x positions) is large."""
        if not self.offloads(entries):
            return fn(*args)
        # No bound: every stream has at most one step in flight and streams are bounded upstream.
        return await asyncio.wrap_future(self._threads.submit(functools.partial(fn, *args)))

    def close(self) -> None:
        self._threads.close()


# Steps of contexts built without the coordinator (tests, tools) run inline.
INLINE_STEPS = StepWorkers(0)
