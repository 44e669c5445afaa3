"""The producer lease: with Redis, one producer in the whole cluster.

The holder renews the lease every third of its lifetime; an instance that dies stops
renewing and another takes over within one lease. Writes to the store carry the lease token
as a fence, so a holder that lost the lease (a long pause) cannot write over its successor.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket

from redis.asyncio import Redis

from app.config import Settings
from app.prices.store import RedisTickStore, TickStore

logger = logging.getLogger(__name__)

_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LocalLease:
    """memory:// runs one process: it always leads."""

    token: str | None = None

    async def acquire(self) -> bool:
        return True

    async def renew(self) -> bool:
        return True

    async def release(self) -> None:
        return None

    renew_interval = 1.0


class RedisLease:
    def __init__(self, redis: Redis, *, key: str, lease_ms: int, instance: str) -> None:
        self._redis = redis
        self._key = key
        self._lease_ms = lease_ms
        self._token = f"{instance}:{secrets.token_hex(8)}"
        self._renew = redis.register_script(_RENEW_LUA)
        self._release = redis.register_script(_RELEASE_LUA)
        self.renew_interval = lease_ms / 3000

    @property
    def token(self) -> str | None:
        return self._token

    async def acquire(self) -> bool:
        return bool(await self._redis.set(self._key, self._token, nx=True, px=self._lease_ms))

    async def renew(self) -> bool:
        return bool(await self._renew(keys=[self._key], args=[self._token, self._lease_ms]))

    async def release(self) -> None:
        try:
            async with asyncio.timeout(1.0):  # not wait_for: on 3.11 it can lose a cancel
                await self._release(keys=[self._key], args=[self._token])
        except Exception as exc:  # noqa: BLE001 - the lease expires by itself anyway
            logger.info("producer: lease not released (%s); it expires by itself", exc)


def instance_name(settings: Settings) -> str:
    """INSTANCE_ID, or hostname:pid; a producer process started by `python -m app` shares its
    server's name, so /readyz can tell whether its own instance leads."""
    return settings.instance_id or f"{socket.gethostname()}:{os.getpid()}"


def create_lease(
    settings: Settings, redis: Redis | None, store: TickStore, *, instance: str
) -> LocalLease | RedisLease:
    if redis is None or not isinstance(store, RedisTickStore):
        return LocalLease()
    return RedisLease(
        redis, key=store.leader_key, lease_ms=settings.leader_lease_ms, instance=instance
    )


async def read_leader(redis: Redis, store: TickStore) -> str | None:
    """The lease holder's token (`instance:random`), if any."""
    if not isinstance(store, RedisTickStore):
        return None
    value = await redis.get(store.leader_key)
    return value.decode() if isinstance(value, bytes) else None
