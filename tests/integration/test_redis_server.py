"""LocalRedisServer: config applied, lifecycle by PID, same-port restart, start errors."""

from __future__ import annotations

import os

import pytest
import redis

from eft_serve.cache.config import LocalRedisConfig
from eft_serve.infra.redis_server import LocalRedisServer, find_redis_server_binary


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still "exists"; we reap our children in stop/kill, so this is a real process.
    return True


def test_binary_is_found() -> None:
    assert os.access(find_redis_server_binary(), os.X_OK)
    with pytest.raises(FileNotFoundError):
        find_redis_server_binary("/nonexistent/redis-server")


def test_configured_memory_policy_and_no_persistence() -> None:
    cfg = LocalRedisConfig(maxmemory="12mb", maxmemory_policy="volatile-lru")
    with LocalRedisServer(cfg) as server:
        assert server.url.startswith("redis://127.0.0.1:")
        with redis.Redis.from_url(server.url) as client:
            conf = client.config_get("*")
            assert conf["maxmemory"] == str(12 * 1024 * 1024)
            assert conf["maxmemory-policy"] == "volatile-lru"
            assert conf["save"] == ""
            assert conf["appendonly"] == "no"
            assert conf["protected-mode"] == "yes"
            assert conf["bind"] == "127.0.0.1"


def test_session_fixture_server(redis_server: LocalRedisServer, redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        assert client.dbsize() == 0  # flushed for us
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"


def test_stop_kills_by_pid_and_removes_dir() -> None:
    server = LocalRedisServer().start()
    pid, workdir = server.pid, server._dir
    assert pid is not None and workdir is not None and os.path.isdir(workdir)
    server.stop()
    assert not _alive(pid)
    assert not os.path.exists(workdir)
    assert not server.running
    server.stop()  # idempotent


def test_kill_and_restart_on_same_port() -> None:
    with LocalRedisServer() as server:
        port, pid = server.port, server.pid
        assert pid is not None
        server.kill()
        assert not _alive(pid) and not server.running
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(server.url, socket_connect_timeout=0.5).ping()
        server.restart()
        assert server.port == port and server.pid != pid
        with redis.Redis.from_url(server.url) as client:
            assert client.ping()
        server.restart()  # restart of a running server also keeps the port
        assert server.port == port


def test_bad_config_raises_with_log_tail() -> None:
    server = LocalRedisServer(LocalRedisConfig(maxmemory_policy="not-a-policy"))
    with pytest.raises(RuntimeError) as info:
        server.start()
    assert "not-a-policy" in str(info.value) or "policy" in str(info.value).lower()
    assert not server.running
    assert server._dir is None  # temp dir cleaned up on failure
