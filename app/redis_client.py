"""Redis clients, configured once: short connect timeout, keepalive, a retry that replaces a
pooled connection that died with a Redis restart, and writes that a cancel always ends.

Why the last: redis-py bounds each socket write with `asyncio.wait_for` when a socket timeout
is set, and on Python 3.11 `wait_for` swallows a cancel that lands as the write completes
(CPython gh-86296, fixed in 3.12 by rebuilding `wait_for` on `asyncio.timeout`). The cancelled
task then carries on as if nothing happened: a producer term whose TaskGroup was cancelled
waits forever for a reader that keeps sending `XREAD BLOCK`. Our connections bound the write
with `asyncio.timeout` instead, which lets a cancel through. This module is the one place that
reaches under redis-py's `Connection` (its private `_send_packed_command`): proven on the
redis-py pinned in requirements/lock.txt; a release without that method keeps its own writes
(`_cancellable`), with a warning, rather than failing at the first command.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import redis
from redis.asyncio import BlockingConnectionPool, Connection, Redis, SSLConnection
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

try:  # redis-py 7 and newer; older releases have no maintenance notifications to turn off
    from redis.maint_notifications import MaintNotificationsConfig
except ImportError:  # pragma: no cover - the lock pins a release that has it
    MaintNotificationsConfig = None  # type: ignore[assignment,misc]

logger = logging.getLogger(__name__)

# Off: its "auto" default reads what a pooled connection has pending through a `wait_for` (the
# race below), and we run on no Redis that announces maintenance.
_NO_MAINTENANCE_NOTIFICATIONS: dict[str, object] = (
    {}
    if MaintNotificationsConfig is None
    else {"maint_notifications_config": MaintNotificationsConfig(enabled=False)}
)


def create_redis(url: str, *, socket_timeout: float | None = 5.0) -> Redis:
    # A blocking pool: a burst of requests waits for a connection instead of failing at once
    # (redis-py's default pool raises past its limit). `from_pool`: the client owns the pool.
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=64,
        timeout=5,
        socket_connect_timeout=2,
        socket_timeout=socket_timeout,
        socket_keepalive=True,
        # jittered, as every retry here (app/backoff.py): instances do not retry in step
        retry=Retry(EqualJitterBackoff(cap=0.5, base=0.05), retries=3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        **_NO_MAINTENANCE_NOTIFICATIONS,
    )
    pool.connection_class = _cancellable(pool.connection_class)
    return Redis.from_pool(pool)


class _CancellableWrites(AbstractConnection):
    """redis-py's `send_packed_command` with `asyncio.timeout` where it has `wait_for`; the
    rest (connecting, health check, errors, closing the socket on any failure) as it is."""

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        if not self.socket_timeout:
            await super().send_packed_command(command, check_health)
            return
        if not self.is_connected:
            await self.connect_check_health(check_health=False)
        if check_health:
            await self.check_health()  # type: ignore[no-untyped-call]  # untyped in redis-py
        if isinstance(command, str):
            command = command.encode()
        if isinstance(command, bytes):
            command = [command]
        try:
            async with asyncio.timeout(self.socket_timeout):
                await self._send_packed_command(command)
        except OSError as exc:
            await self.disconnect(nowait=True)
            if isinstance(exc, TimeoutError) and exc.errno is None:  # our bound, not the OS
                raise RedisTimeoutError("Timeout writing to socket") from None
            raise RedisConnectionError(
                f"Error {exc.errno} while writing to socket. {exc.strerror}."
            ) from exc
        except BaseException:
            # as redis-py: a write cut short (cancelled, or a broken connection) leaves the
            # socket mid-command, so it is closed and the next command reconnects
            await self.disconnect(nowait=True)
            raise


class _CancellableConnection(_CancellableWrites, Connection):
    pass


class _CancellableSSLConnection(_CancellableWrites, SSLConnection):
    pass


# by the class redis-py picks from the URL's scheme (redis://, rediss://: app/config.py)
_CANCELLABLE: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: _CancellableConnection,
    SSLConnection: _CancellableSSLConnection,
}


def _cancellable(connection_class: type[AbstractConnection]) -> type[AbstractConnection]:
    """Ours for `connection_class`, where this redis-py has the private write it builds on."""
    if not hasattr(AbstractConnection, "_send_packed_command"):
        if not _warned:
            _warned.append(True)
            logger.warning(
                "redis-py %s has no Connection._send_packed_command: its own socket writes are "
                "used, and on Python 3.11 a cancel can be lost in them (CPython gh-86296)",
                redis.__version__,
            )
        return connection_class
    return _CANCELLABLE.get(connection_class, connection_class)


_warned: list[bool] = []
