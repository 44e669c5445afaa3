"""app/redis_client.py: a task using Redis ends when it is cancelled, whatever step of a
command the cancel lands in: connecting, the handshake, the write, the blocked read.

On Python 3.11 redis-py's own write (bounded by `asyncio.wait_for`) lost a cancel that landed
as the write completed; the producer's inbox reader then kept sending `XREAD BLOCK` for ever
and its term never ended. Each test walks the cancel across every step of the loop, so the
window (one event-loop turn) is always hit. A task that swallowed its cancel never ends: the
bound below only keeps a failing run from hanging."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest
from redis.asyncio import Connection, Redis
from redis.asyncio.connection import AbstractConnection

from app.feed.inbox import READ_BLOCK_MS, RedisInbox
from app.redis_client import create_redis
from tests.support import RedisServer

STEPS = 40  # event-loop turns: more than connect, handshake and first command take
ENDS_WITHIN = READ_BLOCK_MS / 1000 + 10  # a swallowed cancel never ends; this stops the test


async def _read_inbox(server: RedisServer, redis: Redis) -> None:
    inbox = RedisInbox(redis, url=server.url, prefix="t", max_pending=8, wait_seconds=1)
    async for _entries in inbox.read():
        pass


async def _set_forever(redis: Redis) -> None:
    while True:
        await redis.set("t:beat", "1")


async def _cancelled_at_every_step(work: Callable[[], Awaitable[None]]) -> list[int]:
    """The steps at which a cancel did not end `work`."""
    swallowed = []
    for step in range(STEPS):
        task = asyncio.create_task(work())
        for _ in range(step):
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.wait({task}, timeout=ENDS_WITHIN)
        if not task.done():
            swallowed.append(step)
            task.cancel()  # again, so the next step starts clean
            await asyncio.wait({task}, timeout=ENDS_WITHIN)
    return swallowed


async def test_the_inbox_reader_ends_when_cancelled_at_any_step(redis: RedisServer) -> None:
    # each reader opens a connection of its own: connect, handshake, XREAD BLOCK, as after
    # a Redis restart
    client = create_redis(redis.url)
    try:
        assert await _cancelled_at_every_step(lambda: _read_inbox(redis, client)) == []
    finally:
        await client.aclose()


async def test_a_command_loop_ends_when_cancelled_at_any_step(redis: RedisServer) -> None:
    # what every task of a producer term does: the lease, the store writes
    client = create_redis(redis.url)
    try:
        assert await _cancelled_at_every_step(lambda: _set_forever(client)) == []
    finally:
        await client.aclose()


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
            assert reader.done(), f"still reading {delay}s into the reconnect"
    finally:
        await client.aclose()


def test_a_redis_py_without_the_private_write_keeps_its_own(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The override builds on redis-py's private `_send_packed_command`: a release that drops
    it gets redis-py's own connections and a warning, not an AttributeError at every command."""
    monkeypatch.delattr(AbstractConnection, "_send_packed_command")
    with caplog.at_level(logging.WARNING, logger="app.redis_client"):
        redis = create_redis("redis://127.0.0.1:1/0")
    assert redis.connection_pool.connection_class is Connection
    assert "no Connection._send_packed_command" in caplog.text
