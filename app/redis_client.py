"""Redis clients, configured once: short connect timeout, keepalive, and a retry that
replaces a pooled connection that died with a Redis restart."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


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
    )
    return Redis.from_pool(pool)
