"""The producer's inbox reader, blocked in `XREAD BLOCK` on a client from app/redis_client.py,
ends when it is cancelled at any point of its reconnect after Redis restarted empty.

On Python 3.11 redis-py's own socket write, bounded by `asyncio.wait_for`, can still lose a
cancel that lands as the write completes, CPython gh-86296 (app/redis_client.py says why that
is not worked around there): what bounds a term there is app/feed/term.py, which cancels a
task that outlived the term's end once more. So on 3.11 the reader must end by the second
cancel; from 3.12 (`wait_for` built on `asyncio.timeout`) by the first."""

from __future__ import annotations

import asyncio
import sys

from redis.asyncio import Redis

from app.feed.inbox import READ_BLOCK_MS, RedisInbox
from app.redis_client import create_redis
from tests.support import RedisServer

ENDS_WITHIN = READ_BLOCK_MS / 1000 + 10  # a swallowed cancel never ends; this stops the test


async def _read_inbox(server: RedisServer, redis: Redis) -> None:
    inbox = RedisInbox(redis, url=server.url, prefix="t", max_pending=8, wait_seconds=1)
    async for _entries in inbox.read():
        pass


async def test_a_reader_blocked_through_a_redis_restart_ends_when_cancelled(
    redis: RedisServer,
) -> None:
    client = create_redis(redis.url)
    try:
        for delay in (0, 0.001, 0.005, 0.02, 0.05, 0.1, 0.2):
            reader = asyncio.create_task(_read_inbox(redis, client))
            await asyncio.sleep(0.1)  # into its XREAD BLOCK
            redis.restart()  # empty, as after a SIGKILL
            await asyncio.sleep(delay)  # somewhere in its reconnect
            reader.cancel()
            await asyncio.wait({reader}, timeout=ENDS_WITHIN)
            if not reader.done() and sys.version_info < (3, 12):
                reader.cancel()  # gh-86296 swallowed the first: Term's second cancel
                await asyncio.wait({reader}, timeout=ENDS_WITHIN)
            assert reader.done(), f"still reading {delay}s into the reconnect"
    finally:
        await client.aclose()
