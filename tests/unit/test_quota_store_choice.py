"""Which quota limiter a coordinator replica builds from `auth.quota_store` and `cache.url`."""

from __future__ import annotations

import pytest

from eft_serve.auth.quotas import QuotaLimiter
from eft_serve.auth.shared_quotas import SharedQuotaLimiter
from eft_serve.config import EftConfig, demo_config
from eft_serve.serve.quota_limiter import build_quota_limiter, quota_store_kind


def _cfg(store: str, url: str | None) -> EftConfig:
    data = demo_config().model_dump()
    data["auth"]["quota_store"] = store
    data["cache"]["url"] = url
    return EftConfig.model_validate(data)


class Seen:
    def __init__(self) -> None:
        self.states: list[bool] = []

    def store_state(self, shared: bool) -> None:
        self.states.append(shared)

    def local_decision(self) -> None:
        pass


def test_auto_shares_quotas_when_the_cache_has_a_redis() -> None:
    assert quota_store_kind(_cfg("auto", "redis://127.0.0.1:1")) == "redis"
    assert quota_store_kind(_cfg("auto", None)) == "local"
    assert quota_store_kind(_cfg("local", "redis://127.0.0.1:1")) == "local"
    with pytest.raises(ValueError, match="auth.quota_store: redis needs cache.url"):
        quota_store_kind(_cfg("redis", None))


async def test_the_built_limiter_and_its_first_reported_state() -> None:
    seen = Seen()
    shared = build_quota_limiter(_cfg("auto", "redis://127.0.0.1:1"), seen)
    assert isinstance(shared, SharedQuotaLimiter) and seen.states == [True]
    await shared.close()  # never connected: nothing to close but the client
    local = build_quota_limiter(_cfg("local", None), seen)
    assert isinstance(local, QuotaLimiter) and seen.states == [True, False]
