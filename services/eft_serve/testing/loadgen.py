"""Bounded load against a running stack and a replica-count timeline, for autoscaling checks.

Owns a few client threads that stream sampled requests (fresh seeds, so the result cache cannot
absorb the load) until stopped or a time limit passes, and a poller that records how many replicas
of each pool are RUNNING over time. Traffic goes only to the address given (loopback in tests).

Does NOT know how the stack was started; a test/benchmark helper the service never imports.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field

import grpc

from eft_serve.client import EftClient
from eft_serve.serve.names import POOL_DEPLOYMENT, pool_app_name
from eft_serve.testing.multinode_cluster import running_replicas


@dataclass
class LoadResult:
    completed: int = 0
    tokens: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class LoadGenerator:
    def __init__(
        self, address: str, streams: int, prompt: str, max_new_tokens: int = 96, max_seconds: float = 120.0
    ) -> None:
        self.address = address
        self.streams = streams
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.max_seconds = max_seconds
        self.result = LoadResult()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._seeds = itertools.count(10_000)
        self._threads: list[threading.Thread] = []

    def _worker(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        with EftClient(self.address, timeout=120) as client:
            while not self._stop.is_set() and time.monotonic() < deadline:
                with self._lock:
                    seed = next(self._seeds)
                try:
                    n = sum(
                        len(m.tokens)
                        for m in client.generate(
                            self.prompt, temperature=1.0, seed=seed, max_new_tokens=self.max_new_tokens, ignore_eos=True
                        )
                    )
                    with self._lock:
                        self.result.completed += 1
                        self.result.tokens += n
                except grpc.RpcError as e:
                    with self._lock:
                        self.result.errors[e.code().name] = self.result.errors.get(e.code().name, 0) + 1
                    time.sleep(0.2)

    def start(self) -> LoadGenerator:
        self._threads = [threading.Thread(target=self._worker, daemon=True) for _ in range(self.streams)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> LoadResult:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=150)
        return self.result


class ReplicaTimeline:
    """Polls RUNNING replica counts of each pool every `interval_s` seconds in a thread."""

    def __init__(self, roles: list[str], interval_s: float = 0.5) -> None:
        self.roles = roles
        self.interval_s = interval_s
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            counts = {r: running_replicas(pool_app_name(r), POOL_DEPLOYMENT) for r in self.roles}
            self.samples.append((time.monotonic() - self._t0, counts))
            self._stop.wait(self.interval_s)

    def start(self) -> ReplicaTimeline:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def latest(self) -> dict[str, int]:
        return self.samples[-1][1] if self.samples else {}

    def max_of(self, role: str) -> int:
        return max((c[role] for _, c in self.samples), default=0)

    def render(self) -> str:
        lines = [f"{'t (s)':>7s} " + " ".join(f"{r:>11s}" for r in self.roles)]
        last = None
        for t, counts in self.samples:
            row = tuple(counts[r] for r in self.roles)
            if row != last:  # print changes only
                lines.append(f"{t:7.1f} " + " ".join(f"{c:11d}" for c in row))
                last = row
        return "\n".join(lines)
