"""Build the configured cache: a ``ResultCache`` backend, and the coordinator's ``NextTokenCache``.

Owns: mapping ``CacheConfig`` to a backend instance and wrapping it with the key prefix and the
per-recipe switch. Does NOT start Redis (see
``eft_serve.infra.redis_server``): callers that start one put its url into the config.
"""

from __future__ import annotations

from .base import ResultCache
from .config import CacheConfig
from .memory import MemoryCache
from .next_token_cache import NextTokenCache


def build_cache(cfg: CacheConfig) -> ResultCache | None:
    """The cache for ``cfg``, or ``None`` when caching is disabled."""
    if not cfg.enabled:
        return None
    if cfg.resolved_backend() == "redis":
        from .redis_cache import RedisCache  # only a Redis-backed cache needs the Redis client

        return RedisCache(cfg)
    return MemoryCache(
        max_bytes=cfg.memory_max_bytes,
        max_value_bytes=cfg.max_value_bytes,
        ttl_s=cfg.ttl_s,
    )


def build_next_token_cache(cfg: CacheConfig) -> NextTokenCache | None:
    """The coordinator's typed cache for ``cfg``, or ``None`` when caching is disabled."""
    backend = build_cache(cfg)
    if backend is None:
        return None
    return NextTokenCache(backend, key_prefix=cfg.key_prefix, recipes=cfg.recipes, hmac_key=cfg.resolved_hmac_key())
