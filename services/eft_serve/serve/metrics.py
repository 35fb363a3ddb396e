"""Prometheus metrics of the service, exported through Ray Serve's metrics API (Ray's metrics agent).

Owns every metric's name, type, labels and buckets (docs/operations.md#metrics; the Grafana dashboard
`k8s/grafana/eft-serve.json` reads them, and a unit test checks it names only these):
`ServeMetrics` is the coordinator replica's `Telemetry` (requests, tokens, latencies, pool calls,
speculative acceptance, in-flight requests), `PoolWireMetrics` its Serve calls to the pools
after coalescing, `QuotaMetrics` where its quotas are counted (shared in Redis, or per
replica), `PoolMetrics` the pool replica's engine queue wait, `CacheMetrics` turns the
result cache's cumulative counters into Serve counters. Labels are bounded: recipe (a configured recipe name, else "other"), status code name, pool role, method —
never request or key ids. Ray exports each under `ray_<name>` on every node's metrics port;
Serve adds `deployment`, `replica` and `application` labels.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ray.serve.metrics import Counter, Gauge, Histogram

from eft_serve.coordinator.telemetry import RequestRecord

OTHER = "other"
_EXPORTED = ("hits", "misses", "errors", "bypassed", "bytes_read", "bytes_written")

# Seconds. Tiny CPU models answer a step in milliseconds, large GPU ones in tens of ms, and a
# cold start or an overloaded pool takes seconds: buckets span 1 ms .. 2 min.
LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
TOKEN_GAP_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
QUEUE_BUCKETS = [0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]

# name -> (kind, description); the one list of what we export (the dashboard test reads it).
METRICS: dict[str, tuple[str, str]] = {
    "eft_requests_total": ("counter", "Client calls by method, recipe and status code"),
    "eft_requests_in_flight": ("gauge", "Client calls in progress on this coordinator replica"),
    "eft_request_latency_seconds": ("histogram", "Client call duration (start to end of stream)"),
    "eft_time_to_first_token_seconds": ("histogram", "Call start to first streamed token"),
    "eft_inter_token_latency_seconds": ("histogram", "Gap between streamed tokens"),
    "eft_generated_tokens_total": ("counter", "Completion tokens streamed"),
    "eft_prompt_tokens_total": ("counter", "Prompt tokens of finished calls"),
    "eft_speculative_drafted_tokens_total": ("counter", "Tokens drafted in speculative blocks"),
    "eft_speculative_accepted_tokens_total": ("counter", "Drafted tokens kept by verification"),
    "eft_pool_call_latency_seconds": ("histogram", "One model pool call attempt, coordinator side"),
    "eft_pool_calls_total": ("counter", "Model pool call attempts by role, call and status code"),
    "eft_pool_retries_total": ("counter", "Failed model pool calls tried again, by role and status code"),
    "eft_pool_queue_wait_seconds": ("histogram", "Time a pool call waited for its replica's engine"),
    "eft_pool_wire_calls_total": ("counter", "Serve calls the coordinator sent to a pool, after coalescing"),
    "eft_pool_coalesced_calls_total": ("counter", "Pool calls of streams that rode in a shared Serve call"),
    "eft_quota_shared": ("gauge", "1 while per-key quotas are counted in Redis for all replicas, 0 per replica"),
    "eft_quota_store_fallbacks_total": ("counter", "Switches from shared (Redis) quotas to per-replica ones"),
    "eft_quota_local_admissions_total": ("counter", "Admissions decided per replica because Redis did not answer"),
    **{
        f"eft_cache_{name}_total": ("counter", f"Result cache {name.replace('_', ' ')} (coordinator)")
        for name in _EXPORTED
    },
}


def _counter(name: str, tags: tuple[str, ...] = ()) -> Counter:
    return Counter(name, description=METRICS[name][1], tag_keys=tags or None)


def _histogram(name: str, buckets: list[float], tags: tuple[str, ...] = ()) -> Histogram:
    return Histogram(name, description=METRICS[name][1], boundaries=buckets, tag_keys=tags or None)


class ServeMetrics:
    """The coordinator replica's `Telemetry` as Serve metrics (create inside the replica)."""

    def __init__(self, recipes: Iterable[str]) -> None:
        self._recipes = frozenset(recipes)
        self._in_flight = 0
        self._requests = _counter("eft_requests_total", ("method", "recipe", "code"))
        self._in_flight_gauge = Gauge("eft_requests_in_flight", description=METRICS["eft_requests_in_flight"][1])
        self._latency = _histogram("eft_request_latency_seconds", LATENCY_BUCKETS, ("method", "recipe"))
        self._ttft = _histogram("eft_time_to_first_token_seconds", LATENCY_BUCKETS, ("recipe",))
        self._itl = _histogram("eft_inter_token_latency_seconds", TOKEN_GAP_BUCKETS, ("recipe",))
        self._generated = _counter("eft_generated_tokens_total", ("recipe",))
        self._prompt = _counter("eft_prompt_tokens_total", ("recipe",))
        self._drafted = _counter("eft_speculative_drafted_tokens_total", ("recipe",))
        self._accepted = _counter("eft_speculative_accepted_tokens_total", ("recipe",))
        self._pool_latency = _histogram("eft_pool_call_latency_seconds", LATENCY_BUCKETS, ("role", "call"))
        self._pool_calls = _counter("eft_pool_calls_total", ("role", "call", "code"))
        self._pool_retries = _counter("eft_pool_retries_total", ("role", "code"))
        self._in_flight_gauge.set(0)

    def recipe_label(self, recipe: str) -> str:
        """A configured recipe's name, else "other" (clients choose the string; labels stay bounded)."""
        return recipe if recipe in self._recipes else OTHER

    def request_started(self, record: RequestRecord) -> None:
        self._in_flight += 1
        self._in_flight_gauge.set(self._in_flight)

    def first_token(self, record: RequestRecord, seconds: float) -> None:
        recipe = self.recipe_label(record.recipe)
        self._ttft.observe(seconds, {"recipe": recipe})
        self._generated.inc(1, {"recipe": recipe})

    def inter_token(self, record: RequestRecord, seconds: float) -> None:
        recipe = self.recipe_label(record.recipe)
        self._itl.observe(seconds, {"recipe": recipe})
        self._generated.inc(1, {"recipe": recipe})

    def request_finished(self, record: RequestRecord) -> None:
        self._in_flight = max(0, self._in_flight - 1)
        self._in_flight_gauge.set(self._in_flight)
        recipe = self.recipe_label(record.recipe)
        self._requests.inc(1, {"method": record.method, "recipe": recipe, "code": record.status})
        self._latency.observe(record.latency_s, {"method": record.method, "recipe": recipe})
        if record.prompt_tokens:
            self._prompt.inc(record.prompt_tokens, {"recipe": recipe})
        spec = record.speculation
        if spec.drafted_tokens:
            self._drafted.inc(spec.drafted_tokens, {"recipe": recipe})
        if spec.accepted_tokens:
            self._accepted.inc(spec.accepted_tokens, {"recipe": recipe})

    def pool_call(self, role: str, call: str, seconds: float, status: str) -> None:
        self._pool_latency.observe(seconds, {"role": role, "call": call})
        self._pool_calls.inc(1, {"role": role, "call": call, "code": status})

    def pool_retry(self, role: str, status: str) -> None:
        self._pool_retries.inc(1, {"role": role, "code": status})


class PoolMetrics:
    """A pool replica's metrics (create inside the replica): how long calls wait for the engine."""

    def __init__(self, role: str) -> None:
        self._role = {"role": role}
        self._queue_wait = _histogram("eft_pool_queue_wait_seconds", QUEUE_BUCKETS, ("role",))

    def queue_wait(self, seconds: float) -> None:
        self._queue_wait.observe(seconds, self._role)


class PoolWireMetrics:
    """The coordinator's Serve calls to the pools after coalescing (create inside the replica):
    `eft_pool_calls_total` / `eft_pool_wire_calls_total` is the coalescing factor."""

    def __init__(self) -> None:
        self._calls = _counter("eft_pool_wire_calls_total", ("role",))
        self._riders = _counter("eft_pool_coalesced_calls_total", ("role",))

    def sent(self, role: str, callers: int) -> None:
        tags = {"role": role}
        self._calls.inc(1, tags)
        if callers > 1:
            self._riders.inc(callers, tags)


class QuotaMetrics:
    """The quota limiter's `QuotaObserver` (create inside the replica): whether quotas are shared
    now, how often they fell back to per replica, and how many admissions were decided so."""

    def __init__(self) -> None:
        self._state: bool | None = None
        self._shared = Gauge("eft_quota_shared", description=METRICS["eft_quota_shared"][1])
        self._fallbacks = _counter("eft_quota_store_fallbacks_total")
        self._local = _counter("eft_quota_local_admissions_total")

    def store_state(self, shared: bool) -> None:
        if self._state and not shared:  # a switch away from shared, not a replica configured local
            self._fallbacks.inc(1)
        self._state = shared
        self._shared.set(1 if shared else 0)

    def local_decision(self) -> None:
        self._local.inc(1)


def metrics_endpoints() -> list[str]:
    """The Prometheus endpoint of every live node of the connected Ray cluster (Ray's metrics agent)."""
    import ray

    return [
        f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
        for n in ray.nodes()
        if n.get("Alive") and n.get("MetricsExportPort")
    ]


class CacheMetrics:
    """The result cache's cumulative counters (hits, misses, errors, bypasses, bytes) exported as
    monotonically increasing Serve `Counter`s: each export adds the delta since the last one."""

    def __init__(self, cache: Any | None) -> None:
        self._cache = cache
        self._last = cache.stats() if cache is not None else None
        self._counters = {name: _counter(f"eft_cache_{name}_total") for name in _EXPORTED}

    def export(self) -> None:
        if self._cache is None:
            return
        now = self._cache.stats()
        delta = now.delta(self._last)
        self._last = now
        for name in _EXPORTED:
            value = getattr(delta, name)
            if value > 0:
                self._counters[name].inc(value)
