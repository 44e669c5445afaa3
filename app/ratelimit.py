"""Rate limits: token buckets, kept in this process (`memory://`) or in Redis (shared by every
instance), and the limiter that turns an empty bucket into a 429 with `Retry-After`.

A bucket holds up to `burst` tokens and refills at `rate` tokens a second; each request takes
one, and a request that finds less than one is refused with the time until one is there. In
Redis one Lua script per check refills and takes atomically, on Redis's clock (so instances
whose clocks differ agree), and gives the key a TTL of a full refill: an idle bucket is full
again by then, so it may as well vanish. In process, idle buckets are dropped the same way.

A limiter whose Redis is unreachable (or silent for 3 s) lets requests through for the
next 5 s without asking it, and says so in the log at most once a minute: the routes behind
it answer for themselves, and the token endpoint keeps renewing tokens with its concurrency
cap still in place.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app import metrics
from app.errors import RateLimited

logger = logging.getLogger(__name__)

_REDIS_DOWN_LOG_SECONDS = 60.0
_REDIS_TIMEOUT_SECONDS = 3.0  # a Redis that hangs delays no request longer than this
_REDIS_RETRY_SECONDS = 5.0  # then requests pass unchecked this long, before Redis is tried again


class Buckets(Protocol):
    async def take(self, key: str, *, rate: float, burst: float) -> float:
        """Take a token from `key`'s bucket: 0.0 if there was one, else the seconds until
        there will be (nothing is taken then)."""


class MemoryBuckets:
    """One process's buckets. Idle ones (full again by now) are swept once there are many."""

    _SWEEP_ABOVE = 10_000

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at monotonic)
        self._full_after = 0.0  # the longest refill seen: a bucket idle this long is full

    async def take(self, key: str, *, rate: float, burst: float) -> float:
        now = time.monotonic()
        tokens, at = self._buckets.get(key, (burst, now))
        tokens = min(burst, tokens + (now - at) * rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / rate
        self._buckets[key] = (tokens, now)
        self._full_after = max(self._full_after, burst / rate)
        if len(self._buckets) > self._SWEEP_ABOVE:
            self._sweep(now)
        return wait

    def _sweep(self, now: float) -> None:
        idle_since = now - self._full_after
        self._buckets = {k: v for k, v in self._buckets.items() if v[1] > idle_since}

    def __len__(self) -> int:
        return len(self._buckets)


# KEYS[1] the bucket (a hash: tokens, at µs); ARGV rate/s, burst. Returns the µs to wait
# (0: taken). Redis's own clock: instances whose clocks differ still agree.
_TAKE_LUA = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local kept = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(kept[1]), tonumber(kept[2])
if tokens == nil or at == nil then
  tokens, at = burst, now
end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate / 1000000)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = math.ceil((1 - tokens) * 1000000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return wait
"""


class RedisBuckets:
    """Buckets every instance shares: `{prefix}:rate:{key}`."""

    def __init__(self, redis: Redis, *, prefix: str) -> None:
        self._prefix = prefix
        self._take = redis.register_script(_TAKE_LUA)

    async def take(self, key: str, *, rate: float, burst: float) -> float:
        waited = await self._take(keys=[f"{self._prefix}:rate:{key}"], args=[rate, burst])
        return int(waited) / 1_000_000


def create_buckets(redis: Redis | None, *, prefix: str) -> Buckets:
    """In Redis when the broker is Redis (every instance shares them), else in this process."""
    return MemoryBuckets() if redis is None else RedisBuckets(redis, prefix=prefix)


def retry_after(wait: float) -> int:
    """`Retry-After` is whole seconds: rounded up, and at least 1."""
    return max(1, math.ceil(wait))


class RateLimiter:
    """One limit (`name`: which buckets; `what`: how a refusal names it) over shared buckets."""

    def __init__(
        self, buckets: Buckets, *, name: str, what: str, rate: float, burst: float
    ) -> None:
        self._buckets = buckets
        self._name = name
        self._what = what
        self.rate = rate
        self.burst = burst
        self._redis_down_logged = -math.inf
        self._unchecked_until = -math.inf  # after a Redis failure, not asked again for a while

    async def check(self, key: str) -> None:
        """Take one request from `key`'s bucket, or raise `RateLimited` (429, Retry-After)."""
        if time.monotonic() < self._unchecked_until:
            return
        try:
            async with asyncio.timeout(_REDIS_TIMEOUT_SECONDS):
                wait = await self._buckets.take(
                    f"{self._name}:{key}", rate=self.rate, burst=self.burst
                )
        except (RedisError, TimeoutError) as exc:
            now = time.monotonic()
            self._unchecked_until = now + _REDIS_RETRY_SECONDS
            if now - self._redis_down_logged > _REDIS_DOWN_LOG_SECONDS:
                self._redis_down_logged = now
                logger.warning("rate limit %s not checked: Redis unreachable (%r)", self._name, exc)
            return
        if wait > 0:
            metrics.REFUSED.labels(limit=self._name).inc()
            raise RateLimited(
                f"too many requests for this {self._what}; retry later",
                retry_after=retry_after(wait),
            )
