"""The shared quota store in Redis: one Lua script, run atomically per key (EVALSHA).

Owns the keys' layout and the script. Per API key id, two keys sharing a hash tag (one Redis
Cluster slot): `<prefix>{<key id>}:leases`, a sorted set of open calls' lease ids scored by their
expiry (ms, Redis server time, so replicas' clocks never matter), and `<prefix>{<key id>}:bucket`,
a hash {level, ts} (the token bucket, refilled continuously at capacity per minute; it may go
negative while calls in flight are charged). Both expire by themselves: a lease set when its last
lease has, a bucket once it would be full again. Each call of the script first applies what a
replica reports (ended leases, produced tokens, renewed leases) and drops expired leases, then,
for an admission, checks the bucket and the open count and adds the lease — all in one step, so
concurrent admissions from any number of replicas never exceed the limit.

Only this module of `auth` imports redis; the connection settings come from the caller (the
result cache's: `cache.url` and its credentials). Every failure surfaces as `QuotaStoreUnavailable`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from eft_serve.auth.shared_quotas import QuotaStoreUnavailable, Verdict

DEFAULT_PREFIX = "eft:quota:"

# KEYS: 1 leases zset, 2 bucket hash.
# ARGV: 1 new lease id ("" = report only), 2 ttl ms, 3 max streams (0 = none), 4 capacity per minute
# (0 = no bucket), 5 tokens produced, 6 n = number of ended leases, 7..6+n their ids, then live ids.
# Returns {1, open} admitted; {0, 1, retry ms} bucket empty; {0, 2, open} all streams taken.
_SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local max_streams = tonumber(ARGV[3])
local capacity = tonumber(ARGV[4])
local charge = tonumber(ARGV[5])
local n_ended = tonumber(ARGV[6])
for i = 7, 6 + n_ended do redis.call('ZREM', KEYS[1], ARGV[i]) end
for i = 7 + n_ended, #ARGV do redis.call('ZADD', KEYS[1], now + ttl, ARGV[i]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local level = nil
if capacity > 0 then
  local b = redis.call('HMGET', KEYS[2], 'level', 'ts')
  level = tonumber(b[1]) or capacity
  local ts = tonumber(b[2]) or now
  level = math.min(capacity, level + math.max(0, now - ts) * capacity / 60000) - charge
end
local verdict = {1, 0}
if ARGV[1] ~= '' then
  if level ~= nil and level < 1 then
    verdict = {0, 1, math.ceil((1 - level) * 60000 / capacity)}
  else
    local open = redis.call('ZCARD', KEYS[1])
    if max_streams > 0 and open >= max_streams then
      verdict = {0, 2, open}
    else
      redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
      verdict = {1, open + 1}
    end
  end
end
if level ~= nil then
  redis.call('HSET', KEYS[2], 'level', tostring(level), 'ts', now)
  redis.call('PEXPIRE', KEYS[2], math.ceil((capacity - level) * 60000 / capacity) + 1000)
end
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('PEXPIRE', KEYS[1], ttl + 1000) end
return verdict
"""


class RedisQuotaStore:
    def __init__(
        self,
        url: str | None = None,
        *,
        client: aioredis.Redis | None = None,
        op_timeout_s: float = 0.25,
        prefix: str = DEFAULT_PREFIX,
        client_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if client is None and not url:
            raise ValueError("RedisQuotaStore needs a url or a client")
        self._url = url
        self._client = client
        self._owns_client = client is None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._timeout = op_timeout_s
        self._prefix = prefix
        self._kwargs = client_kwargs or {}
        self._script: Any = None

    def keys(self, key_id: str) -> tuple[str, str]:
        base = f"{self._prefix}{{{key_id}}}"
        return f"{base}:leases", f"{base}:bucket"

    def _get_script(self) -> Any:
        # redis.asyncio connections belong to the loop that opened them: rebuild on another loop.
        loop = asyncio.get_running_loop()
        if self._client is None or (self._owns_client and self._client_loop is not loop):
            assert self._url is not None
            self._client = aioredis.Redis.from_url(
                self._url,
                socket_connect_timeout=self._timeout,
                # No retries inside redis-py: the limiter falls back at once and retries later.
                retry=Retry(NoBackoff(), 0),
                **self._kwargs,
            )
            self._client_loop = loop
            self._script = None
        if self._script is None:
            self._script = self._client.register_script(_SCRIPT)  # EVALSHA, loading it on NOSCRIPT
        return self._script

    async def _call(self, key_id: str, args: list[Any]) -> Any:
        try:
            script = self._get_script()
            return await asyncio.wait_for(script(keys=list(self.keys(key_id)), args=args), self._timeout)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # refused, timed out, error reply, bad credentials: all "down"
            raise QuotaStoreUnavailable(f"{type(e).__name__}: {e}") from e

    async def admit(
        self,
        key_id: str,
        lease_id: str,
        ttl_s: float,
        max_streams: int,
        capacity: int,
        charge: int,
        releases: list[str],
    ) -> Verdict:
        out = await self._call(key_id, [lease_id, _ms(ttl_s), max_streams, capacity, charge, len(releases), *releases])
        if int(out[0]) == 1:
            return Verdict(True, open_streams=int(out[1]))
        if int(out[1]) == 1:
            return Verdict(False, "tokens", retry_after_s=int(out[2]) / 1000.0)
        return Verdict(False, "streams", open_streams=int(out[2]))

    async def sync(
        self, key_id: str, ttl_s: float, capacity: int, charge: int, releases: list[str], live: list[str]
    ) -> None:
        await self._call(key_id, ["", _ms(ttl_s), 0, capacity, charge, len(releases), *releases, *live])

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._owns_client:
            try:
                await asyncio.wait_for(client.aclose(), max(self._timeout, 1.0))
            except Exception:  # noqa: BLE001 - closing a dead connection is not worth an error
                pass


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
