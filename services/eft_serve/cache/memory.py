"""In-process LRU result cache, bounded in bytes.

Owns: a per-process ``ResultCache`` used when no Redis is configured (and in tests): the stats
it reports and which values it refuses (over ``max_value_bytes``). The LRU order, the byte bound
and the TTL are `cachetools`' (``LRUCache`` / ``TTLCache`` sized by ``getsizeof``).
Does NOT know: Redis, models, or what the values mean. Not shared between processes.

Size accounting is ``len(utf-8 key) + len(value)`` per entry; Python object overhead is
not counted, so set ``memory_max_bytes`` with some headroom.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import cachetools

from .base import CacheStats

# What an entry holds: the value and its accounted size (the key's bytes included).
_Entry = tuple[bytes, int]


def _entry_size(entry: _Entry) -> int:
    return entry[1]


class _CountingLRU(cachetools.LRUCache[str, _Entry]):
    """cachetools' LRU, counting the entries it evicts to stay under its byte bound."""

    evictions = 0

    def popitem(self) -> tuple[str, _Entry]:
        item = super().popitem()
        self.evictions += 1
        return item


class _CountingTTL(cachetools.TTLCache[str, _Entry]):
    """cachetools' LRU with a time to live, counting evictions (expired entries are not evictions)."""

    evictions = 0

    def popitem(self) -> tuple[str, _Entry]:
        item = super().popitem()
        self.evictions += 1
        return item


class MemoryCache:
    def __init__(
        self,
        max_bytes: int,
        max_value_bytes: int | None = None,
        ttl_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be > 0")
        self._max_bytes = max_bytes
        self._max_value_bytes = max_value_bytes
        self._data: _CountingLRU | _CountingTTL
        if ttl_s is None:
            self._data = _CountingLRU(maxsize=max_bytes, getsizeof=_entry_size)
        else:
            self._data = _CountingTTL(maxsize=max_bytes, ttl=ttl_s, timer=clock, getsizeof=_entry_size)
        self._stats = CacheStats()
        # No awaits inside the critical sections, but a replica may call from several
        # threads (e.g. executors), and cachetools' caches are not thread-safe: guard them.
        self._lock = threading.Lock()

    @property
    def size_bytes(self) -> int:
        return int(self._data.currsize)

    def __len__(self) -> int:
        return len(self._data)

    def _expire(self) -> None:
        if isinstance(self._data, cachetools.TTLCache):
            self._data.expire()  # expired entries free their bytes now, not when next evicted

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        with self._lock:
            self._expire()
            for key in keys:
                entry = self._data.get(key)  # a hit becomes the most recently used entry
                if entry is None:
                    self._stats.misses += 1
                    out.append(None)
                    continue
                self._stats.hits += 1
                self._stats.bytes_read += len(entry[0])
                out.append(entry[0])
        return out

    async def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        with self._lock:
            for key, value in items:
                value = bytes(value)
                size = len(key.encode()) + len(value)
                if (self._max_value_bytes is not None and len(value) > self._max_value_bytes) or (
                    size > self._max_bytes
                ):
                    self._stats.oversize += 1
                    continue
                self._data[key] = (value, size)  # evicts least recently used entries to fit
                self._stats.sets += 1
                self._stats.bytes_written += len(value)

    def stats(self) -> CacheStats:
        with self._lock:
            self._stats.evictions = self._data.evictions
            return self._stats.snapshot()

    async def close(self) -> None:
        with self._lock:
            evicted = self._data.evictions
            self._data.clear()  # older cachetools clear by popitem: those are no evictions
            self._data.evictions = evicted
