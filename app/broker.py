"""The message broker: the only module that imports `broadcaster`.

Ticks go out with `Broker.publish` on `prices:{SYMBOL}` and come back through
`Broker.subscribe`. Around broadcaster 0.3.1 this module fixes what would reach users:

* its Redis backend marks itself ready before SUBSCRIBE is sent, so with redis-py 8 the
  listener sees "not subscribed" and stops at once: nothing is ever delivered;
* its listener dies silently when Redis drops or restarts, and raises on a non-UTF-8 payload;
* its queues are unbounded, and two concurrent subscribes to one new channel lose one of them.

`ResilientRedisBackend` subscribes before it listens, reconnects with backoff and resubscribes
everything, detects a silent connection with pings, and drops undecodable payloads.
`BoundedBroadcast` bounds every queue (a full queue pushes back on the reader, and Redis's own
output-buffer limit bounds what waits there) and serialises subscribes per channel.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from broadcaster import Broadcast, BroadcastBackend, Event
from broadcaster._backends.memory import MemoryBackend
from broadcaster._backends.redis import RedisBackend
from broadcaster._base import Subscriber
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app import metrics
from app.redis_client import create_redis

logger = logging.getLogger(__name__)

QUEUE_SIZE = 10_000
_IDLE_PING_SECONDS = 5.0
_DEAD_AFTER_SECONDS = 15.0
_BACKOFF_MAX_SECONDS = 5.0


def price_channel(symbol: str) -> str:
    return f"prices:{symbol}"


class ResilientRedisBackend(RedisBackend):
    def __init__(self, url: str, *, queue_size: int = QUEUE_SIZE) -> None:
        self._url = url
        # No socket timeout: the PubSub connection is idle between messages by design.
        self._conn = create_redis(url, socket_timeout=None)
        self._pubsub = self._conn.pubsub()
        self._ready = asyncio.Event()
        self._queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=queue_size)
        self._listener: asyncio.Task[None] | None = None
        self._channels: set[str] = set()
        self._live = False  # a PubSub connection is up or being set up
        self.connected = False
        self.on_reconnect: Callable[[], None] | None = None

    async def connect(self) -> None:
        self._listener = asyncio.create_task(self._pubsub_listener(), name="broker-listener")

    async def disconnect(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            try:
                await self._listener
            except asyncio.CancelledError:
                pass
        await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        await self._conn.aclose()

    async def subscribe(self, channel: str) -> None:
        self._channels.add(channel)
        if self._live:
            # Subscribe first, then wake the listener: redis-py 8's listen() ends at once
            # when nothing is subscribed yet.
            try:
                await self._pubsub.subscribe(channel)
            except (RedisConnectionError, RedisTimeoutError, OSError):
                pass  # the listener resubscribes every channel when it reconnects
        self._ready.set()

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)
        if self._live:
            try:
                await self._pubsub.unsubscribe(channel)
            except (RedisConnectionError, RedisTimeoutError, OSError):
                pass

    async def _pubsub_listener(self) -> None:
        backoff = 0.1
        first = True
        while True:
            await self._ready.wait()
            if not self._channels:
                self._ready.clear()
                continue
            try:
                self._live = True
                await self._pubsub.subscribe(*self._channels)
                self.connected = True
                metrics.BROKER_CONNECTED.set(1)
                if not first:
                    logger.warning("broker: reconnected to Redis, %d channels", len(self._channels))
                    metrics.BROKER_RECONNECTS.inc()
                    if self.on_reconnect is not None:
                        self.on_reconnect()
                first = False
                backoff = 0.1
                await self._read_until_dead()
            except asyncio.CancelledError:
                raise
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                logger.warning("broker: Redis connection lost (%s); reconnecting", exc)
            except Exception:
                logger.exception("broker: listener failed; reconnecting")
            self._live = self.connected = False
            metrics.BROKER_CONNECTED.set(0)
            # A fresh PubSub: the old one may hold a half-read reply.
            try:
                await self._pubsub.aclose()  # type: ignore[no-untyped-call]
            except Exception:  # noqa: BLE001 - closing a broken connection may fail too
                pass
            self._pubsub = self._conn.pubsub()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX_SECONDS)

    async def _read_until_dead(self) -> None:
        last_heard = time.monotonic()
        pinged = False
        while True:
            message = await self._pubsub.get_message(timeout=1.0)
            now = time.monotonic()
            if message is None:
                if now - last_heard > _DEAD_AFTER_SECONDS:
                    raise RedisTimeoutError("no answer to ping")
                if now - last_heard > _IDLE_PING_SECONDS and not pinged:
                    await self._pubsub.ping()
                    pinged = True
                continue
            last_heard, pinged = now, False
            # Then everything already received, without yielding to the loop in between: a
            # busy loop runs this task once per turn, and one message per turn would leave the
            # backlog in the socket, out of reach of the hub's skipping of stale ticks.
            while message is not None:
                await self._enqueue(message)
                message = await self._pubsub.get_message(timeout=0.0)

    async def _enqueue(self, message: dict[str, Any]) -> None:
        if message["type"] != "message":
            return
        try:
            event = Event(channel=message["channel"].decode(), message=message["data"].decode())
        except UnicodeDecodeError:
            metrics.BROKER_DROPPED.labels(reason="not_utf8").inc()
            logger.warning("broker: dropped a non-UTF-8 message")
            return
        await self._queue.put(event)


class BoundedMemoryBackend(MemoryBackend):
    def __init__(self, url: str, *, queue_size: int = QUEUE_SIZE) -> None:
        super().__init__(url)
        self._queue_size = queue_size
        self.connected = True

    async def connect(self) -> None:
        self._published = asyncio.Queue(maxsize=self._queue_size)


class BoundedBroadcast(Broadcast):
    def __init__(self, backend: BroadcastBackend, *, queue_size: int = QUEUE_SIZE) -> None:
        super().__init__(backend=backend)
        self._queue_size = queue_size
        self._locks: dict[str, asyncio.Lock] = {}

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[Subscriber]:
        async with self.subscribe_many([channel]) as queue:
            yield Subscriber(queue)

    @asynccontextmanager
    async def subscribe_many(
        self, channels: list[str]
    ) -> AsyncIterator[asyncio.Queue[Event | None]]:
        """One bounded queue that receives the events of every channel in `channels`."""
        queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize=self._queue_size)
        subscribed: list[str] = []
        try:
            for channel in channels:
                async with self._locks.setdefault(channel, asyncio.Lock()):
                    if not self._subscribers.get(channel):
                        await self._backend.subscribe(channel)
                        self._subscribers[channel] = {queue}
                    else:
                        self._subscribers[channel].add(queue)
                subscribed.append(channel)
            yield queue
        finally:
            for channel in subscribed:
                async with self._locks[channel]:
                    self._subscribers[channel].discard(queue)
                    if not self._subscribers[channel]:
                        del self._subscribers[channel]
                        await self._backend.unsubscribe(channel)


class Broker:
    """Publish and subscribe on named channels, through broadcaster."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._backend: ResilientRedisBackend | BoundedMemoryBackend
        if url.startswith(("redis://", "rediss://")):
            self._backend = ResilientRedisBackend(url)
        elif url.startswith("memory://"):
            self._backend = BoundedMemoryBackend(url)
        else:
            raise ValueError(f"unsupported BROADCAST_URL scheme: {url.split(':', 1)[0]}")
        self._broadcast = BoundedBroadcast(self._backend)

    @property
    def connected(self) -> bool:
        return self._backend.connected

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        if isinstance(self._backend, ResilientRedisBackend):
            self._backend.on_reconnect = callback

    async def connect(self) -> None:
        await self._broadcast.connect()

    async def disconnect(self) -> None:
        await self._broadcast.disconnect()

    def listener_error(self) -> BaseException | None:
        """The exception that ended broadcaster's own listener task, if it ended."""
        task: asyncio.Task[None] = self._broadcast._listener_task
        if task.done() and not task.cancelled():
            return task.exception()
        return None

    async def publish(self, channel: str, message: str) -> None:
        await self._broadcast.publish(channel, message)

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[Callable[[], Awaitable[str]]]:
        """Yield a `receive()` that returns the next message on `channel`."""
        async with self._broadcast.subscribe(channel) as subscriber:

            async def receive() -> str:
                event: Any = await subscriber.get()
                return str(event.message)

            yield receive

    @asynccontextmanager
    async def subscribe_many(
        self, channels: list[str], *, burst: int = 1024
    ) -> AsyncIterator[Callable[[], Awaitable[list[tuple[str, str]]]]]:
        """Yield a `receive()` that waits for the next message on any of `channels`, then
        returns it with every other one already waiting (up to `burst`), as (channel, message)."""
        async with self._broadcast.subscribe_many(channels) as queue:

            async def receive() -> list[tuple[str, str]]:
                event = await queue.get()
                events = [event]
                while len(events) < burst and not queue.empty():
                    events.append(queue.get_nowait())
                return [(e.channel, e.message) for e in events if e is not None]

            yield receive
