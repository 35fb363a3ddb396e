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
    # auto = redis when a url is set, else the in-process LRU.
    backend: Literal["auto", "redis", "memory"] = "auto"
    url: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    # Name of an env var holding the password; keeps secrets out of config files.
    password_env: str | None = None
    tls: bool = False
    tls_ca_file: str | None = None
    key_prefix: str = DEFAULT_KEY_PREFIX
    ttl_s: int = Field(3600, gt=0)
    # Short on purpose: a cache lookup that is slower than recomputing is worse than no cache.
    op_timeout_s: float = Field(0.05, gt=0)
    reconnect_backoff_s: float = Field(1.0, ge=0)
    memory_max_bytes: int = Field(64 * _MiB, gt=0)
    max_value_bytes: int = Field(1 * _MiB, gt=0)
    # Name of an env var holding a secret (e.g. a Kubernetes Secret): values are then signed
    # (HMAC-SHA256) on write and verified on read; a bad MAC is a miss and is overwritten.
    hmac_key_env: str | None = None
    # Per-recipe switch; recipes not listed follow ``enabled``.
    recipes: dict[str, bool] = Field(default_factory=dict)

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

    # Start one when no cache url is configured.
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)  # 0 = pick a free port
    maxmemory: str = "256mb"
    maxmemory_policy: str = "allkeys-lru"
    binary: str | None = None
