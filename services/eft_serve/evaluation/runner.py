"""Sends every (question × condition) through a `Generator`, a few at a time, and collects answers.

Owns the decoding settings of the evaluation (greedy, an answer ends at the newline), the thread
pool, retries of transient failures and progress reporting. Conditions with identical request
settings are sent once and share their answers. Knows nothing about gRPC (the `Generator` does)
or about scoring.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Protocol

from eft_serve.demo.world import Question
from eft_serve.evaluation.conditions import Condition

Log = Callable[[str], None]


class TransientError(Exception):
    """Raised by a `Generator` for a failure worth retrying (overload, a lost replica)."""


class Generator(Protocol):
    """Generate one completion: prompt + `EftClient.generate` keyword arguments → text."""

    def __call__(self, prompt: str, params: Mapping[str, Any]) -> str: ...


@dataclass(frozen=True)
class Decoding:
    """How every answer is decoded: greedy, ended by the newline that ends an answer."""

    max_new_tokens: int = 40
    stop: tuple[str, ...] = ("\n",)
    seed: int = 0  # greedy makes it irrelevant; sent so a request is fully pinned

    def params(self) -> dict[str, Any]:
        return {"temperature": 0.0, "max_new_tokens": self.max_new_tokens, "stop": list(self.stop), "seed": self.seed}


Answers = dict[str, list[str]]  # condition name → answer text per question, in question order


def run_conditions(
    generate: Generator,
    questions: Sequence[Question],
    conditions: Sequence[Condition],
    decoding: Decoding = Decoding(),
    threads: int = 4,
    retries: int = 2,
    log: Log = lambda _m: None,
) -> Answers:
    """Answers of every condition for every question.

    A `TransientError` is retried `retries` times; anything else (or the last retry) aborts the run.
    """
    unique: dict[tuple, Condition] = {}
    for c in conditions:
        unique.setdefault(c.key(), c)
    texts: dict[tuple, list[str | None]] = {k: [None] * len(questions) for k in unique}
    left = {k: len(questions) for k in unique}
    started = time.perf_counter()
    lock = threading.Lock()

    def one(key: tuple, i: int) -> None:
        params = {**unique[key].request_params(), **decoding.params()}
        for attempt in range(retries + 1):
            try:
                texts[key][i] = generate(questions[i].prompt, params)
                return
            except TransientError:
                if attempt == retries:
                    raise
                time.sleep(0.5 * (attempt + 1))

    def done(key: tuple) -> Callable[[Future], None]:
        def cb(f: Future) -> None:
            if f.cancelled() or f.exception() is not None:
                return
            with lock:  # callbacks run on the worker threads
                left[key] -= 1
                last = left[key] == 0
            if last:
                log(f"  {unique[key].name}: {len(questions)} answers ({time.perf_counter() - started:.0f}s elapsed)")

        return cb

    pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="eft-eval")
    try:
        futures = []
        for key in unique:  # condition by condition, so conditions finish (and log) in order
            for i in range(len(questions)):
                f = pool.submit(one, key, i)
                f.add_done_callback(done(key))
                futures.append(f)
        finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in finished if f.exception() is not None), None)
        if failed is not None:
            raise failed.exception()  # type: ignore[misc]
    finally:
        # On an error or Ctrl-C, drop the queued requests instead of sending them all first.
        pool.shutdown(wait=True, cancel_futures=True)
    return {c.name: [t or "" for t in texts[c.key()]] for c in conditions}
