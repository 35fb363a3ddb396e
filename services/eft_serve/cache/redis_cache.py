"""Redis-backed result cache (``redis.asyncio``).

Owns: one-round-trip batched get/set against Redis, value framing (magic, version,
crc32) so foreign or corrupted values read as misses, and a small circuit breaker: after a
failed op the cache bypasses Redis for ``reconnect_backoff_s`` and then tries again, so it
recovers by itself when Redis comes back.
Does NOT know: models, Ray, gRPC, or what the payload bytes mean.

Never raises to the caller for backend trouble; every op is bounded by ``op_timeout_s``.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
import zlib
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError
from redis.retry import Retry

from .base import CacheStats
from .config import CacheConfig

log = logging.getLogger(__name__)

# Frame: magic(4) | version(1) | crc32(payload)(4) | payload. Big-endian header.
_MAGIC = b"EFTc"
_VERSION = 1
_HEADER = struct.Struct(">4sBI")


class CorruptValue(ValueError):
    """A stored value is not one of our frames (foreign, truncated, or bit-flipped)."""


def frame_value(payload: bytes) -> bytes:
    return _HEADER.pack(_MAGIC, _VERSION, zlib.crc32(payload)) + payload


def unframe_value(raw: bytes) -> bytes:
    if len(raw) < _HEADER.size:
        raise CorruptValue("value shorter than header")
    magic, version, crc = _HEADER.unpack_from(raw)
    if magic != _MAGIC:
        raise CorruptValue("bad magic")
    if version != _VERSION:
        raise CorruptValue(f"unknown frame version {version}")
    payload = raw[_HEADER.size :]
    if zlib.crc32(payload) != crc:
        raise CorruptValue("crc mismatch")
    return payload


class RedisCache:
    def __init__(self, cfg: CacheConfig, client: aioredis.Redis | None = None) -> None:
        if client is None and not cfg.url:
            raise ValueError("RedisCache needs cfg.url or a client")
        self._cfg = cfg
        self._client = client
        self._owns_client = client is None
        # redis.asyncio connections are bound to the loop that opened them; if we are later
        # used from another loop we rebuild the client instead of failing forever.
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._stats = CacheStats()
        self._down_until = 0.0  # monotonic; > now means "bypass"
        self._closed = False

    # -- client lifecycle -------------------------------------------------------------

    def _make_client(self) -> aioredis.Redis:
        cfg = self._cfg
        kwargs: dict[str, Any] = {
            "socket_connect_timeout": cfg.op_timeout_s,
            # No retries inside redis-py: our own backoff decides when to try again, and a
            # retry sleep would only burn the op budget.
            "retry": Retry(NoBackoff(), 0),
            "health_check_interval": 0,
        }
        if cfg.username is not None:
            kwargs["username"] = cfg.username
        password = cfg.resolved_password()
        if password is not None:
            kwargs["password"] = password
        if cfg.uses_tls() and cfg.tls_ca_file:
            kwargs["ssl_ca_certs"] = cfg.tls_ca_file
        url = cfg.effective_url()
        assert url is not None
        return aioredis.Redis.from_url(url, **kwargs)

    def _get_client(self) -> aioredis.Redis:
        loop = asyncio.get_running_loop()
        if self._client is None or (self._owns_client and self._client_loop is not loop):
            # Dropping a client bound to a dead/other loop: its sockets are GC-closed.
            self._client = self._make_client()
            self._client_loop = loop
        elif self._client_loop is None:
            self._client_loop = loop
        return self._client

    # -- circuit breaker --------------------------------------------------------------

    def _is_down(self) -> bool:
        return time.monotonic() < self._down_until

    def _mark_down(self, op: str, exc: BaseException) -> None:
        self._stats.errors += 1
        first = not self._is_down()
        self._down_until = time.monotonic() + self._cfg.reconnect_backoff_s
        if first:
            log.warning(
                "result cache: redis %s failed (%s: %s); bypassing for %.2fs",
                op,
                type(exc).__name__,
                exc,
                self._cfg.reconnect_backoff_s,
            )

    async def _run(self, op: str, coro: Any) -> tuple[bool, Any]:
        """Await ``coro`` under the op timeout; (ok, result). Never raises (except cancel)."""
        try:
            return True, await asyncio.wait_for(coro, self._cfg.op_timeout_s)
        except asyncio.CancelledError:
            raise
        except ResponseError as exc:
            # The server answered (e.g. OOM under noeviction): Redis is up, so count it but
            # do not trip the breaker and bypass reads too.
            self._stats.errors += 1
            log.debug("result cache: redis %s error reply: %s", op, exc)
            return False, None
        except Exception as exc:  # noqa: BLE001 - the cache never raises: timeouts, connection/protocol errors, auth, ...
            self._mark_down(op, exc)
            return False, None

    # -- ResultCache ------------------------------------------------------------------

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        n = len(keys)
        if n == 0:
            return []
        miss: list[bytes | None] = [None] * n
        if self._closed or self._is_down():
            self._stats.bypassed += n
            self._stats.misses += n
            return miss
        try:
            client = self._get_client()
        except Exception as exc:  # noqa: BLE001 - never raise for the backend (e.g. password_env vanished)
            self._mark_down("connect", exc)
            self._stats.misses += n
            return miss
        ok, raws = await self._run("MGET", client.mget(list(keys)))
        if not ok:
            self._stats.misses += n
            return miss
        out: list[bytes | None] = []
        for raw in raws:
            if raw is None:
                self._stats.misses += 1
                out.append(None)
                continue
            try:
                payload = unframe_value(raw)
            except CorruptValue:
                # Treated as a miss; the caller recomputes and overwrites it.
                self._stats.corrupt += 1
                self._stats.errors += 1
                self._stats.misses += 1
                out.append(None)
                continue
            self._stats.hits += 1
            self._stats.bytes_read += len(payload)
            out.append(payload)
        return out

    async def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        todo = []
        for key, value in items:
            if len(value) > self._cfg.max_value_bytes:
                self._stats.oversize += 1
                continue
            todo.append((key, value))
        if not todo:
            return
        if self._closed or self._is_down():
            self._stats.bypassed += len(todo)
            return
        try:
            client = self._get_client()
        except Exception as exc:  # noqa: BLE001 - the cache never raises for its backend
            self._mark_down("connect", exc)
            return
        pipe = client.pipeline(transaction=False)
        written = 0
        for key, value in todo:
            pipe.set(key, frame_value(bytes(value)), ex=self._cfg.ttl_s)
            written += len(value)
        ok, _ = await self._run("SET pipeline", pipe.execute())
        if ok:
            self._stats.sets += len(todo)
            self._stats.bytes_written += written

    def stats(self) -> CacheStats:
        return self._stats.snapshot()

    async def close(self) -> None:
        self._closed = True
        client, self._client = self._client, None
        if client is not None and self._owns_client:
            try:
                await asyncio.wait_for(client.aclose(), max(self._cfg.op_timeout_s, 1.0))
            except Exception:  # noqa: BLE001 - closing a dead connection is not worth an error
                pass
