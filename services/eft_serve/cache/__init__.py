"""Next-token result cache: opaque bytes keyed by (model, token prefix, request shape).

Knows nothing of models, Ray or gRPC; callers store serialized protobuf.
"""

from .base import CacheStats, ResultCache
from .config import CacheConfig, LocalRedisConfig
from .factory import build_cache
from .keys import candidates_shape, next_token_key
from .memory import MemoryCache
from .redis_cache import RedisCache

__all__ = [
    "CacheConfig",
    "CacheStats",
    "LocalRedisConfig",
    "MemoryCache",
    "RedisCache",
    "ResultCache",
    "build_cache",
    "candidates_shape",
    "next_token_key",
]
