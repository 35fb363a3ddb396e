"""The cache interface and its counters.

Owns: the ``ResultCache`` protocol every backend implements and ``CacheStats``.
Does NOT know: any backend, nor what keys/values mean (values are opaque bytes).

Contract: ``get_many``/``set_many`` never raise for backend trouble (timeouts, lost
connections, corrupt values); they degrade to misses / dropped writes and count it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass
class CacheStats:
    """Counters of one cache.

    hits/misses count keys (hits + misses == keys asked for; every ``None`` is a miss,
    whatever its cause). errors counts failed backend operations plus corrupt values;
    corrupt is the subset of errors that were undecodable values. bypassed counts keys or
    items skipped without touching the backend (it is known to be down). oversize counts
    values not stored because they exceed ``max_value_bytes``; evictions counts values
    dropped by the in-process LRU.
    """

    hits: int = 0
    misses: int = 0
    errors: int = 0
    corrupt: int = 0
    bypassed: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    sets: int = 0
    oversize: int = 0
    evictions: int = 0

    def snapshot(self) -> CacheStats:
        """An independent copy (the live counters keep moving)."""
        return dataclasses.replace(self)

    def delta(self, since: CacheStats) -> CacheStats:
        """Counters accumulated after ``since`` was snapshotted (e.g. per stream)."""
        return CacheStats(**{f.name: getattr(self, f.name) - getattr(since, f.name) for f in dataclasses.fields(self)})

    def __sub__(self, other: CacheStats) -> CacheStats:
        return self.delta(other)

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


@runtime_checkable
class ResultCache(Protocol):
    """Async bytes-in/bytes-out cache. Implementations must never raise on backend errors."""

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Values for ``keys`` in order; ``None`` for a miss (absent, error, corrupt)."""
        ...

    async def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Store ``(key, value)`` pairs best-effort (may drop on error or oversize)."""
        ...

    def stats(self) -> CacheStats:
        """A snapshot of the counters."""
        ...

    async def close(self) -> None: ...
