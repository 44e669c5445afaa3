"""`Broker`: publish on named channels through broadcaster, subscribe through our fan-out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

from broadcaster import Broadcast

from app.broker.backends import (
    DEAD_AFTER_SECONDS,
    IDLE_PING_SECONDS,
    QUEUE_SIZE,
    BoundedMemoryBackend,
    ResilientRedisBackend,
)
from app.broker.fanout import BurstSink, Fanout
from app.prices.store import ScriptedWrite


def price_channel(symbol: str) -> str:
    return f"prices:{symbol}"


class Broker:
    """Publish and subscribe on named channels. `url`: `redis://`, `rediss://` or `memory://`.

    `queue_size` bounds memory://'s queue; `ping_after` and `dead_after` (seconds) are how
    quiet a Redis subscription may be before it is pinged, and before it is dropped and
    reopened."""

    def __init__(
        self,
        url: str,
        *,
        queue_size: int = QUEUE_SIZE,
        ping_after: float = IDLE_PING_SECONDS,
        dead_after: float = DEAD_AFTER_SECONDS,
    ) -> None:
        self.url = url
        self._fanout = Fanout()
        self._locks: dict[str, asyncio.Lock] = {}  # subscribes and unsubscribes, per channel
        self._backend: ResilientRedisBackend | BoundedMemoryBackend
        if url.startswith(("redis://", "rediss://")):
            self._backend = ResilientRedisBackend(
                url, self._fanout, ping_after=ping_after, dead_after=dead_after
            )
        elif url.startswith("memory://"):
            self._backend = BoundedMemoryBackend(self._fanout, queue_size=queue_size)
        else:
            raise ValueError(f"unsupported BROADCAST_URL scheme: {url.split(':', 1)[0]}")
        self._broadcast = Broadcast(backend=self._backend)

    @property
    def connected(self) -> bool:
        """memory://: between connect and disconnect. Redis: while the subscription is live
        (it opens once something subscribes)."""
        return self._backend.connected

    async def connect(self) -> None:
        await self._broadcast.connect()

    async def disconnect(self) -> None:
        await self._broadcast.disconnect()

    async def publish(self, channel: str, message: str) -> None:
        await self._broadcast.publish(channel, message)

    async def publish_many(self, messages: list[tuple[str, str]]) -> None:
        """Publish (channel, message) pairs in order: on Redis in one round trip (a pipeline),
        which `Broadcast.publish`, a call per message, cannot give."""
        if messages:
            await self._backend.publish_many(messages)

    @property
    def publishes_written(self) -> bool:
        """Whether `publish_written` can run (Redis: the store's and the broker's Redis are
        one, BROADCAST_URL)."""
        return isinstance(self._backend, ResilientRedisBackend)

    async def publish_written(
        self, write: ScriptedWrite, runs: list[tuple[str, list[str]]]
    ) -> list[int]:
        """Run a store write and publish its runs' messages (channel, messages per run of the
        write, in order) in one script: a run's first messages that the write did not keep
        (their seq was kept already) are not published, and nothing is if the write is
        refused. One command and one answer for what `publish_many` after the write's own
        call takes two. Sent before the first await: calls run in Redis in call order.
        The write's outcome, for the store to read (`TickStore.written`)."""
        if not isinstance(self._backend, ResilientRedisBackend):
            raise TypeError("publish_written needs a Redis broker")
        return await self._backend.publish_written(write, runs)

    @asynccontextmanager
    async def subscribe_bursts(
        self, channels: list[str], sink: BurstSink
    ) -> AsyncIterator[BurstSubscription]:
        """Call `sink` with every message on `channels`, as (channel, message) pairs in order,
        a burst at a time: on Redis from the read that brought them (one read's worth), on
        memory:// what waited in its queue. Entered, the subscription is in place: what is
        published after it is delivered. `sink` must not block; what it raises is logged and
        counted, and the subscription goes on. One sink takes a channel once (ValueError).
        The subscription it yields takes more channels, or leaves some, while it lasts."""
        subscription = BurstSubscription(
            sink, fanout=self._fanout, backend=self._backend, locks=self._locks
        )
        try:
            await subscription.add(channels)
            yield subscription
        finally:
            await subscription.close()


class BurstSubscription:
    """The channels one sink takes, for as long as `Broker.subscribe_bursts` lasts. `add` and
    `remove` change them while it runs (instruments added or disabled): a channel is
    subscribed on the backend when its first sink takes it and left when its last goes, and
    the delivery of every other channel goes on untouched, with no gap and no duplicate
    (Redis SUBSCRIBE and UNSUBSCRIBE name single channels; nothing is resubscribed)."""

    def __init__(
        self,
        sink: BurstSink,
        *,
        fanout: Fanout,
        backend: ResilientRedisBackend | BoundedMemoryBackend,
        locks: dict[str, asyncio.Lock],
    ) -> None:
        self._sink = sink
        self._fanout = fanout
        self._backend = backend
        self._locks = locks  # the broker's: subscribes and unsubscribes, per channel
        self._taken: list[str] = []
        self._closed = False

    @property
    def channels(self) -> list[str]:
        return list(self._taken)

    async def add(self, channels: Iterable[str]) -> None:
        """Take `channels` too; returns once what is published on them is delivered. A
        channel taken already is left as it is."""
        for channel in channels:
            if channel in self._taken:
                continue
            # Serialised per channel: a second subscriber to a channel being subscribed
            # returns only once the first's SUBSCRIBE is in place.
            async with self._locks.setdefault(channel, asyncio.Lock()):
                if self._closed:  # ended while this waited for the lock
                    return
                # Registered before SUBSCRIBE: nothing Redis sends after it is missed.
                first = self._fanout.add(channel, self._sink)
                self._taken.append(channel)
                if first:
                    await self._backend.subscribe(channel)

    async def remove(self, channels: Iterable[str]) -> None:
        """Stop taking `channels`: nothing more of them reaches the sink from this call on."""
        idle = []
        for channel in channels:
            if channel in self._taken:
                self._taken.remove(channel)
                if self._fanout.remove(channel, self._sink):
                    idle.append(channel)
        await self._leave(idle)

    async def close(self) -> None:
        self._closed = True
        taken, self._taken = self._taken, []
        # Unregistered at once, before any await (a second cancellation cannot leave it).
        idle = [channel for channel in taken if self._fanout.remove(channel, self._sink)]
        await self._leave(idle)

    async def _leave(self, idle: list[str]) -> None:
        """Unsubscribe the channels no sink takes any more (unless one took them meanwhile)."""
        for channel in idle:
            async with self._locks[channel]:
                if not self._fanout.takes(channel):
                    await self._backend.unsubscribe(channel)
