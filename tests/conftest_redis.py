"""Pytest plugin: real loopback redis-server fixtures (no mocks).

Load with ``pytest_plugins = ["tests.conftest_redis"]`` in the top conftest, or
``-p tests.conftest_redis`` on the command line (run from the repo root).

Fixtures:
  redis_server        session-wide LocalRedisServer (stopped at session end)
  redis_url           url of that server, FLUSHALLed before each test
  fresh_redis_server  a private server per test, for kill/restart tests
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from eft_serve.cache.config import LocalRedisConfig
from eft_serve.infra.redis_server import LocalRedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[LocalRedisServer]:
    server = LocalRedisServer(LocalRedisConfig(maxmemory="64mb"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: LocalRedisServer) -> str:
    if not redis_server.running:  # a test may have killed it; give the next one a live server
        redis_server.restart()
    with redis.Redis.from_url(redis_server.url, socket_timeout=5) as client:
        client.flushall()
    return redis_server.url


@pytest.fixture
def fresh_redis_server() -> Iterator[LocalRedisServer]:
    server = LocalRedisServer(LocalRedisConfig(maxmemory="32mb"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
