"""Redis clients, configured once: short connect timeout, keepalive, a retry that replaces a
pooled connection that died with a Redis restart, and no maintenance notifications.

redis-py bounds each socket write with `asyncio.wait_for` when a socket timeout is set, and on
Python 3.11 `wait_for` can lose a cancel that lands as the write completes (CPython gh-86296).
A connection class that bounded the write with `asyncio.timeout` instead was tried and taken
out again: with it, a subscriber missed a tick in tests/prices/test_implausible_seq.py (6 of 24
runs, against 1 of 22 without), cause not yet found. A producer term that a lost cancel would keep
alive is bounded by app/feed/term.py instead (the process exits and is restarted).
"""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

try:  # redis-py 7 and newer; older releases have no maintenance notifications to turn off
    from redis.maint_notifications import MaintNotificationsConfig
except ImportError:  # pragma: no cover - the lock pins a release that has it
    MaintNotificationsConfig = None  # type: ignore[assignment,misc]


# Off: its "auto" default reads what a pooled connection has pending through a `wait_for` (the
# race above), and we run on no Redis that announces maintenance.
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
    return Redis.from_pool(pool)
