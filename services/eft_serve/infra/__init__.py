"""Process-level infrastructure we run ourselves (e.g. a loopback redis-server)."""

from .redis_server import LocalRedisServer, find_redis_server_binary

__all__ = ["LocalRedisServer", "find_redis_server_binary"]
