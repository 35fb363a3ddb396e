"""Next-token result cache: opaque bytes keyed by (model, token prefix, request shape).

Knows nothing of models, Ray or gRPC; callers store serialized protobuf. Names are loaded
lazily, so importing the config or the keys never imports the Redis client: the coordinator
and the core stay importable without Redis (rule: only the Redis backend imports `redis`).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CacheStats": ".base",
    "ResultCache": ".base",
    "CacheConfig": ".config",
    "LocalRedisConfig": ".config",
    "build_cache": ".factory",
    "build_next_token_cache": ".factory",
    "NextTokenCache": ".next_token_cache",
    "candidates_shape": ".keys",
    "next_token_key": ".keys",
    "MemoryCache": ".memory",
    "RedisCache": ".redis_cache",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
