"""Observation points of the service: what happened to each request and to each pool call.

Owns the observer protocol (`Telemetry`: a request started, its first token, each later token,
its end; a pool call's latency and outcome, a retry), the per-request record the observers see
(`RequestRecord`), the one-request timer the RPC bodies drive (`RequestTrace`), the status name
of an exception, and the no-op default. Transport-neutral: knows nothing of Prometheus, Ray,
gRPC or log formats — `serve.metrics` turns observations into Serve metrics, `coordinator.access_log`
into JSON lines.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from eft_serve.coordinator.request import SpeculationStats, Usage
from eft_serve.errors import EftError, Status

OK = "OK"


def status_of(exc: BaseException | None) -> str:
    """The status name a client sees for a call that ended with `exc` (None: OK)."""
    if exc is None:
        return OK
    if isinstance(exc, EftError):
        return exc.status.value
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return Status.CANCELLED.value  # the client went away (or cancelled) mid-call
    return Status.INTERNAL.value


@dataclass
class RequestRecord:
    """One client call, filled in as it runs; observers read it (never keep it beyond the call)."""

    method: str  # "Generate" (also under Complete) or "Score"
    request_id: str
    recipe: str  # as asked (or the server default); metric labels bound it to configured names
    key_id: str = "-"  # the API key's id once admitted; "-" when auth is off or the call was refused
    prompt: str = ""  # observers decide whether to keep it (the access log only when configured)
    status: str = OK
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None  # call start -> first token (None: no token)
    latency_s: float = 0.0  # call start -> end
    speculation: SpeculationStats = field(default_factory=SpeculationStats)
    cache_hits: int = 0
    cache_misses: int = 0


class Telemetry(Protocol):
    """Everything the service reports; implementations must be cheap and must not raise."""

    def request_started(self, record: RequestRecord) -> None: ...

    def first_token(self, record: RequestRecord, seconds: float) -> None: ...

    def inter_token(self, record: RequestRecord, seconds: float) -> None: ...

    def request_finished(self, record: RequestRecord) -> None: ...

    def pool_call(self, role: str, call: str, seconds: float, status: str) -> None:
        """One attempt of a pool call (`call`: "next_token" | "draft") and its outcome."""
        ...

    def pool_retry(self, role: str, status: str) -> None:
        """A failed pool call (`status`) is being tried again."""
        ...


class NullTelemetry:
    """Observes nothing (the default: tests, benchmarks, the evaluation's in-process backend)."""

    def request_started(self, record: RequestRecord) -> None:
        pass

    def first_token(self, record: RequestRecord, seconds: float) -> None:
        pass

    def inter_token(self, record: RequestRecord, seconds: float) -> None:
        pass

    def request_finished(self, record: RequestRecord) -> None:
        pass

    def pool_call(self, role: str, call: str, seconds: float, status: str) -> None:
        pass

    def pool_retry(self, role: str, status: str) -> None:
        pass


NULL_TELEMETRY: Telemetry = NullTelemetry()


class FanOut:
    """Several observers as one (metrics and the access log)."""

    def __init__(self, observers: Sequence[Telemetry]) -> None:
        self._all = list(observers)

    def request_started(self, record: RequestRecord) -> None:
        for o in self._all:
            o.request_started(record)

    def first_token(self, record: RequestRecord, seconds: float) -> None:
        for o in self._all:
            o.first_token(record, seconds)

    def inter_token(self, record: RequestRecord, seconds: float) -> None:
        for o in self._all:
            o.inter_token(record, seconds)

    def request_finished(self, record: RequestRecord) -> None:
        for o in self._all:
            o.request_finished(record)

    def pool_call(self, role: str, call: str, seconds: float, status: str) -> None:
        for o in self._all:
            o.pool_call(role, call, seconds, status)

    def pool_retry(self, role: str, status: str) -> None:
        for o in self._all:
            o.pool_retry(role, status)


class RequestTrace:
    """Times one call as the client sees it: from the RPC body's start, through every streamed
    token, to its end (success, error or cancellation), and reports to a `Telemetry`."""

    def __init__(
        self,
        telemetry: Telemetry,
        record: RequestRecord,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._t = telemetry
        self.record = record
        self._clock = clock
        self._started = clock()
        self._last_token: float | None = None
        self._done = False
        telemetry.request_started(record)

    def tokens(self, n: int) -> None:
        """`n` tokens just became available to the client (one streamed chunk)."""
        if n <= 0:
            return
        now = self._clock()
        if self._last_token is None:
            self.record.ttft_s = now - self._started
            self._t.first_token(self.record, self.record.ttft_s)
            n -= 1
        else:
            # Tokens of one chunk arrive together: the gap is shared among them.
            gap = (now - self._last_token) / n
            for _ in range(n):
                self._t.inter_token(self.record, gap)
            n = 0
        self._last_token = now

    def usage(self, usage: Usage) -> None:
        self.record.prompt_tokens = usage.prompt_tokens
        self.record.completion_tokens = usage.completion_tokens
        self.record.speculation = usage.speculation
        self.record.cache_hits = usage.fetch.cache_hits
        self.record.cache_misses = usage.fetch.cache_misses

    def finish(self, exc: BaseException | None = None) -> None:
        """End the call (idempotent: the first end counts)."""
        if self._done:
            return
        self._done = True
        self.record.status = status_of(exc)
        self.record.latency_s = self._clock() - self._started
        self._t.request_finished(self.record)
