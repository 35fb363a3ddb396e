"""In-process LRU result cache, bounded in bytes.

Owns: a per-process ``ResultCache`` used when no Redis is configured (and in tests).
Does NOT know: Redis, models, or what the values mean. Not shared between processes.

Size accounting is ``len(utf-8 key) + len(value)`` per entry; Python object overhead is
not counted, so set ``memory_max_bytes`` with some headroom.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from .base import CacheStats


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
        self._ttl_s = ttl_s
        self._clock = clock
        # key -> (value, expires_at or None, accounted size); order = recency (last = newest).
        self._data: OrderedDict[str, tuple[bytes, float | None, int]] = OrderedDict()
        self._bytes = 0
        self._stats = CacheStats()
        # No awaits inside the critical sections, but a replica may call from several
        # threads (e.g. executors), so guard the dict anyway; it is uncontended in practice.
        self._lock = threading.Lock()

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._data)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        now = self._clock()
        with self._lock:
            for key in keys:
                entry = self._data.get(key)
                if entry is not None and entry[1] is not None and entry[1] <= now:
                    self._drop(key)  # expired: same as absent
                    entry = None
                if entry is None:
                    self._stats.misses += 1
                    out.append(None)
                    continue
                self._data.move_to_end(key)
                self._stats.hits += 1
                self._stats.bytes_read += len(entry[0])
                out.append(entry[0])
        return out

    async def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        now = self._clock()
        expires = now + self._ttl_s if self._ttl_s is not None else None
        with self._lock:
            for key, value in items:
                value = bytes(value)
                size = len(key.encode()) + len(value)
                if (self._max_value_bytes is not None and len(value) > self._max_value_bytes) or (
                    size > self._max_bytes
                ):
                    self._stats.oversize += 1
                    continue
                if key in self._data:
                    self._drop(key)
                self._data[key] = (value, expires, size)
                self._bytes += size
                self._stats.sets += 1
                self._stats.bytes_written += len(value)
                while self._bytes > self._max_bytes:
                    oldest = next(iter(self._data))
                    self._drop(oldest)
                    self._stats.evictions += 1

    def _drop(self, key: str) -> None:
        _, _, size = self._data.pop(key)
        self._bytes -= size

    def stats(self) -> CacheStats:
        with self._lock:
            return self._stats.snapshot()

    async def close(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0
