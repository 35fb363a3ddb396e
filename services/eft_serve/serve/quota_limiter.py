"""The coordinator replica's quota limiter, as `auth.quota_store` and the result cache's Redis say.

Owns the choice (redis: `SharedQuotaLimiter` over `RedisQuotaStore`, reusing `cache.url` and its
credentials and backoff; local: the per-replica `QuotaLimiter`) and the one log line saying which.
Knows nothing of how either limits (`eft_serve.auth`).
"""

from __future__ import annotations

import logging
from typing import Any

from eft_serve.auth.quotas import Limiter, QuotaLimiter
from eft_serve.auth.shared_quotas import QuotaObserver, SharedQuotaLimiter
from eft_serve.config import EftConfig

log = logging.getLogger("eft_serve")


def quota_store_kind(cfg: EftConfig) -> str:
    """ "redis" or "local": `auth.quota_store` with auto resolved (redis when cache.url is set)."""
    if cfg.auth.quota_store == "auto":
        return "redis" if cfg.cache.url else "local"
    if cfg.auth.quota_store == "redis" and not cfg.cache.url:
        raise ValueError(
            "auth.quota_store: redis needs cache.url (the Redis the quotas share with the result cache); "
            "set cache.url, or auth.quota_store: local for per-replica quotas"
        )
    return cfg.auth.quota_store


def build_quota_limiter(cfg: EftConfig, observer: QuotaObserver | None = None) -> Limiter:
    if quota_store_kind(cfg) == "local":
        log.info("quotas: per coordinator replica (auth.quota_store local, or no cache.url)")
        if observer is not None:
            observer.store_state(False)
        return QuotaLimiter()
    from eft_serve.auth.redis_quota_store import RedisQuotaStore

    cache = cfg.cache
    kwargs: dict[str, Any] = {}
    if cache.username is not None:
        kwargs["username"] = cache.username
    password = cache.resolved_password()
    if password is not None:
        kwargs["password"] = password
    if cache.uses_tls() and cache.tls_ca_file:
        kwargs["ssl_ca_certs"] = cache.tls_ca_file
    store = RedisQuotaStore(
        cache.effective_url(),
        op_timeout_s=cfg.auth.quota_op_timeout_s,
        prefix=f"{cache.key_prefix}quota:",
        client_kwargs=kwargs,
    )
    log.info("quotas: shared by every coordinator replica through Redis (cache.url)")
    if observer is not None:
        observer.store_state(True)
    return SharedQuotaLimiter(
        store,
        lease_ttl_s=cfg.auth.quota_lease_ttl_s,
        retry_store_after_s=max(cache.reconnect_backoff_s, 0.1),
        observer=observer,
    )
