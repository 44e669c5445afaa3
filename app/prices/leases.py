"""Stream leases: the streams (WebSocket and SSE) each token subject holds on every instance,
so that `WS_MAX_CONNECTIONS_PER_SUBJECT` holds across the cluster. Redis only: with memory://
there is one process, and StreamRegistry's own count is the whole truth.

Per subject, a sorted set `{prefix}:streams:{subject}`: a member per open stream, scored with
the expiry of its lease (Redis's clock, ms). Admitting a stream drops the expired members,
counts the rest and adds its own, in one Lua script. Each instance renews the leases of all its
streams every third of `STREAM_LEASE_SECONDS` and removes a stream's member when it ends; an
instance that dies renews nothing, so its streams stop counting within one lease.

Redis unreachable (or silent for 3 s): a stream is admitted on the instance's own count
(one warning a minute), and the next renewal writes its lease; a renewal also rewrites leases
lost with a Redis restart.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import secrets
import time

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.errors import RateLimited

logger = logging.getLogger(__name__)

_WARN_EVERY_SECONDS = 60.0
_ACQUIRE_TIMEOUT_SECONDS = 3.0  # a Redis that hangs delays no handshake longer than this
_RENEW_CHUNK = 500  # members per renewal script: Redis stays responsive in between

# KEYS[1] the subject's set; ARGV limit, lease ms, member. 1: admitted, 0: at the limit.
_ACQUIRE_LUA = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS the subjects' sets; ARGV lease ms, then per key: how many members, the members.
_RENEW_LUA = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local until_ms = now + tonumber(ARGV[1])
local i = 2
for k = 1, #KEYS do
  local n = tonumber(ARGV[i])
  for m = 1, n do
    redis.call('ZADD', KEYS[k], until_ms, ARGV[i + m])
  end
  i = i + n + 1
  redis.call('PEXPIRE', KEYS[k], ARGV[1])
end
return 1
"""


class StreamLeases:
    """This instance's streams, leased per token subject in Redis."""

    def __init__(
        self, redis: Redis, *, prefix: str, instance: str, limit: int, lease_seconds: float
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        # Members name the instance, and are unique even if two instances share a name.
        self._member_prefix = f"{instance}:{secrets.token_hex(4)}"
        self._limit = limit
        self._lease_ms = math.ceil(lease_seconds * 1000)
        self.renew_every = lease_seconds / 3
        self._acquire = redis.register_script(_ACQUIRE_LUA)
        self._renew = redis.register_script(_RENEW_LUA)
        self._held: dict[str, set[str]] = {}
        self._ids = itertools.count(1)
        self._writing = asyncio.Lock()  # a removal never overtakes a renewal that re-adds it
        self._removals: set[asyncio.Task[None]] = set()
        self._warned_at = -math.inf

    def _key(self, subject: str) -> str:
        return f"{self._prefix}:streams:{subject}"

    async def acquire(self, subject: str) -> str:
        """Lease a stream for `subject`, or raise RateLimited at the limit across instances."""
        member = f"{self._member_prefix}:{next(self._ids)}"
        try:
            async with asyncio.timeout(_ACQUIRE_TIMEOUT_SECONDS):
                admitted = await self._acquire(
                    keys=[self._key(subject)], args=[self._limit, self._lease_ms, member]
                )
        except (RedisError, TimeoutError) as exc:
            self._warn("stream leases: Redis unreachable; counting on this instance (%r)", exc)
            admitted = 1
        if not admitted:
            raise RateLimited("too many connections for this token subject")
        self._held.setdefault(subject, set()).add(member)
        return member

    def release(self, subject: str, member: str) -> None:
        """The stream ended: forget its lease here at once, and in Redis soon."""
        held = self._held.get(subject)
        if held is not None:
            held.discard(member)
            if not held:
                del self._held[subject]
        task = asyncio.get_running_loop().create_task(self._remove(subject, [member]))
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)

    async def _remove(self, subject: str, members: list[str]) -> None:
        try:
            async with self._writing:
                await self._redis.zrem(self._key(subject), *members)
        except (RedisError, OSError, RuntimeError) as exc:  # its lease runs out by itself
            logger.debug("stream leases: could not remove %s: %r", members, exc)

    async def renew(self) -> None:
        """Extend (or write again) the lease of every stream open on this instance."""
        async with self._writing:
            held = [(subject, sorted(members)) for subject, members in self._held.items()]
            keys: list[str] = []
            args: list[str | int] = [self._lease_ms]
            for subject, members in held:
                for start in range(0, len(members), _RENEW_CHUNK):
                    chunk = members[start : start + _RENEW_CHUNK]
                    keys.append(self._key(subject))
                    args += [len(chunk), *chunk]
                    if len(args) > _RENEW_CHUNK:
                        await self._renew(keys=keys, args=args)
                        keys, args = [], [self._lease_ms]
            if keys:
                await self._renew(keys=keys, args=args)

    async def run(self) -> None:
        """Renew every `renew_every` seconds, for as long as the instance runs."""
        while True:
            await asyncio.sleep(self.renew_every)
            try:
                await self.renew()
            except RedisError as exc:
                self._warn("stream leases: renewal failed, retrying next period (%r)", exc)

    async def close(self) -> None:
        """Shutdown: give back every lease this instance holds (streams are closed by now)."""
        for subject, members in list(self._held.items()):
            await self._remove(subject, sorted(members))
        self._held.clear()
        if self._removals:
            await asyncio.wait(list(self._removals), timeout=2)

    def _warn(self, message: str, arg: object) -> None:
        now = time.monotonic()
        if now - self._warned_at > _WARN_EVERY_SECONDS:
            self._warned_at = now
            logger.warning(message, arg)
