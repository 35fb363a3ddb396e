"""The coordinator's health: a cached, periodic reachability probe of every pool.

Owns the probe loop (every `health_probe_period_s`, each pool's `info()` under
`health_probe_timeout_s`, all pools at once) and the cached verdict that health checks answer
from at once — a health check never calls a pool, so it never queues behind requests.
Transport-neutral: a transport maps `HealthReport.serving` to its own status and subscribes to
changes with `add_listener`. Knows nothing of gRPC or Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from eft_serve.coordinator.pool_client import PoolClient
from eft_serve.errors import ResourceExhausted

log = logging.getLogger("eft_serve")


@dataclass(frozen=True)
class HealthReport:
    """SERVING iff `serving`; `unreachable` names the pools that missed their last probe."""

    serving: bool
    unreachable: tuple[str, ...] = ()
    detail: str = ""


HealthListener = Callable[[HealthReport], Awaitable[None]]


class PoolProber:
    def __init__(self, pools: Mapping[str, PoolClient], period_s: float, timeout_s: float) -> None:
        self._pools = dict(pools)
        self._period_s = period_s
        self._timeout_s = timeout_s
        self._errors: dict[str, str] = {}  # pool -> why its last probe failed (absent: it answered)
        self._started = False
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[HealthListener] = []
        self._last: HealthReport = self.report()

    def report(self) -> HealthReport:
        if not self._started:
            return HealthReport(False, detail="the coordinator has not finished starting")
        if not self._errors:
            return HealthReport(True)
        names = tuple(sorted(self._errors))
        detail = "; ".join(f"{n}: {self._errors[n]}" for n in names)
        return HealthReport(False, names, f"unreachable model pools: {detail}")

    def add_listener(self, listener: HealthListener) -> None:
        """`listener` is awaited with the new report whenever the verdict changes."""
        self._listeners.append(listener)

    async def start(self) -> None:
        """Mark every pool reachable (start-up just heard from each) and begin probing."""
        self._started = True
        self._errors.clear()
        await self._publish()
        if self._task is None:
            self._task = asyncio.create_task(
                _probe_loop(weakref.ref(self), self._period_s), name="eft-pool-health-probe"
            )

    async def stop(self) -> None:
        task = self.stop_nowait()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def stop_nowait(self) -> asyncio.Task[None] | None:
        """Cancel the probe loop (for synchronous shutdown hooks); returns the cancelled task."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        return task

    async def probe_once(self) -> HealthReport:
        names = list(self._pools)
        answers = await asyncio.gather(*(self._probe(n) for n in names))
        self._errors = {n: why for n, why in zip(names, answers) if why is not None}
        await self._publish()
        return self._last

    async def _probe(self, name: str) -> str | None:
        try:
            await asyncio.wait_for(self._pools[name].info(), self._timeout_s)
        except ResourceExhausted:
            return None  # it answered: busy (queue full), not unreachable
        except TimeoutError:
            return f"no answer within {self._timeout_s:g}s"
        except Exception as e:  # noqa: BLE001 - any failure means the pool did not answer
            return f"{type(e).__name__}: {e}"
        return None

    async def _publish(self) -> None:
        report, last = self.report(), self._last
        self._last = report
        if (report.serving, report.unreachable) == (last.serving, last.unreachable):
            return
        if report.serving:
            log.info("health: SERVING (every model pool answers)")
        else:
            log.warning("health: NOT_SERVING (%s)", report.detail)
        for listener in self._listeners:
            await listener(report)


async def _probe_loop(ref: weakref.ref[PoolProber], period_s: float) -> None:
    # Holds the prober weakly: a coordinator dropped without `stop()` stops being probed.
    while True:
        await asyncio.sleep(period_s)
        prober = ref()
        if prober is None:
            return
        try:
            await prober.probe_once()
        except Exception:  # a listener's bug must not end the probe
            log.exception("pool health probe failed")
        del prober
