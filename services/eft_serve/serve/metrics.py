"""Prometheus metrics of a coordinator replica, exported through Ray Serve's metrics API.

Owns turning the result cache's cumulative counters (hits, misses, errors, bypasses, bytes)
into monotonically increasing Serve `Counter`s, by exporting the delta since the last export.
"""

from __future__ import annotations

from typing import Any

from ray.serve.metrics import Counter

_EXPORTED = ("hits", "misses", "errors", "bypassed", "bytes_read", "bytes_written")


class CacheMetrics:
    def __init__(self, cache: Any | None) -> None:
        self._cache = cache
        self._last = cache.stats() if cache is not None else None
        self._counters = {
            name: Counter(f"eft_cache_{name}_total", description=f"Result cache {name.replace('_', ' ')} (coordinator)")
            for name in _EXPORTED
        }

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
