"""The message broker: the only module that imports `broadcaster`.

Ticks go out with `Broker.publish` on `prices:{SYMBOL}` and come back through
`Broker.subscribe_bursts` (the fan-out hub) or `Broker.subscribe` / `subscribe_many`.
Around broadcaster 0.3.1 this module fixes what would reach users:

* its Redis backend marks itself ready before SUBSCRIBE is sent, so with redis-py 8 the
  listener sees "not subscribed" and stops at once: nothing is ever delivered;
* its listener dies silently when Redis drops or restarts, and raises on a non-UTF-8 payload;
* its queues are unbounded, and two concurrent subscribes to one new channel lose one of them.

`ResilientRedisBackend` publishes with redis-py but subscribes on a connection of its own,
read by a bare asyncio protocol with hiredis's parser: redis-py's PubSub spends about 170 µs
of CPU per message in its coroutine stack (measured on the fan-out server with 200 ticks/s;
see the README's Performance section). It subscribes before it listens, reconnects with
backoff and resubscribes everything, detects a silent connection with pings, and drops
undecodable payloads.
`BoundedBroadcast` bounds every queue (a full queue pushes back on the reader, and Redis's own
output-buffer limit bounds what waits there) and serialises subscribes per channel.

The fan-out hub subscribes with `Broker.subscribe_bursts`: a callback the Redis backend calls
with every message of one read, from the read itself, with no queue and no task switch in
between. The two queue-and-task hops cost a tick ~45 µs of server CPU (cold caches: a tick
comes every few ms), measured with `python -m bench.tickcost` (README, Performance). Queue
subscribers (`subscribe`, `subscribe_many`) still go through broadcaster's listener; on the
memory backend a burst subscriber is fed from a queue by a task of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import hiredis
from broadcaster import Broadcast, BroadcastBackend, Event
from broadcaster._backends.memory import MemoryBackend
from broadcaster._backends.redis import RedisBackend
from broadcaster._base import Subscriber
from redis.asyncio.connection import SSLConnection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app import metrics
from app.redis_client import create_redis

logger = logging.getLogger(__name__)

QUEUE_SIZE = 10_000
_IDLE_PING_SECONDS = 5.0
_DEAD_AFTER_SECONDS = 15.0
_BACKOFF_MAX_SECONDS = 5.0
_COMMAND_TIMEOUT_SECONDS = 2.0
_SUBSCRIBE_REPLIES = (b"subscribe", b"unsubscribe")


BurstSink = Callable[[list[tuple[str, str]]], None]
"""Takes the (channel, message) pairs of one read, in order. It must not block; what it raises
is logged and counted (`pricefeed_broker_dropped_total{reason="sink_failed"}`) and the
subscription goes on."""


def price_channel(symbol: str) -> str:
    return f"prices:{symbol}"


class _SubscriberProtocol(asyncio.Protocol):
    """One Redis connection in subscribe mode, read without redis-py's per-message machinery
    (a coroutine, a timeout scope and a dict per message): every complete reply in a read is
    parsed by hiredis and each message handed to `on_message` at once."""

    def __init__(
        self, on_message: Callable[[bytes, bytes], None], on_read_end: Callable[[], None]
    ) -> None:
        self._reader = hiredis.Reader()
        self._on_message = on_message
        self._on_read_end = on_read_end
        self._replies: deque[asyncio.Future[Any]] = deque()  # commands awaiting an answer
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.last_heard = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        while self._replies:
            waiter = self._replies.popleft()
            if not waiter.done():
                waiter.set_exception(RedisConnectionError("connection to Redis lost"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.last_heard = time.monotonic()
        reader = self._reader
        reader.feed(data)
        try:
            self._read_replies(reader)
        finally:
            self._on_read_end()  # what was read is handed over even if a reply broke the read

    def _read_replies(self, reader: hiredis.Reader) -> None:
        try:
            while (reply := reader.gets()) is not False:
                if type(reply) is list and len(reply) == 3 and reply[0] == b"message":
                    self._on_message(reply[1], reply[2])
                elif type(reply) is list and reply and reply[0] in _SUBSCRIBE_REPLIES:
                    pass  # (un)subscribe confirmations: a PING after them says they are done
                elif self._replies:  # PING in subscribe mode answers [b"pong", b""]; AUTH, +OK
                    waiter = self._replies.popleft()
                    if not waiter.done():
                        waiter.set_result(reply)
                elif isinstance(reply, hiredis.ReplyError):
                    raise RedisConnectionError(f"Redis answered an error: {reply}")
        except (hiredis.ProtocolError, RedisConnectionError) as exc:
            logger.warning("broker: %s; reconnecting", exc)
            self.close()

    def write(self, *args: str) -> None:
        """Write one command whose answer nobody awaits: SUBSCRIBE and UNSUBSCRIBE (their
        confirmations are skipped; a PING behind them is answered once they are done)."""
        if self.transport is None or self.transport.is_closing():
            raise RedisConnectionError("not connected to Redis")
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            raw = arg.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
        self.transport.write(b"".join(parts))

    def request(self, *args: str) -> asyncio.Future[Any]:
        """Write one command; the future gets its answer, in order (a waiter given up on
        still takes its answer's place)."""
        self.write(*args)
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._replies.append(waiter)
        return waiter

    async def call(self, *args: str, timeout: float = _COMMAND_TIMEOUT_SECONDS) -> Any:
        reply = await asyncio.wait_for(self.request(*args), timeout)
        if isinstance(reply, hiredis.ReplyError):
            raise RedisConnectionError(f"Redis refused {args[0]}: {reply}")
        return reply

    def pause(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class ResilientRedisBackend(RedisBackend):
    def __init__(self, url: str, *, queue_size: int = QUEUE_SIZE) -> None:
        self._url = url
        self._conn = create_redis(url)  # publishing; subscribing has a connection of its own
        self._options: dict[str, Any] = dict(parse_url(url))
        self._ready = asyncio.Event()
        self._queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=queue_size)
        self._held: deque[Event] = deque()  # read while the queue was full; reading is paused
        self._listener: asyncio.Task[None] | None = None
        self._channels: set[str] = set()
        self._proto: _SubscriberProtocol | None = None  # the live subscribed connection
        self._bursts: dict[BurstSink, list[tuple[str, str]]] = {}  # this read's, per sink
        # BoundedBroadcast's own registries, per channel: the burst sinks called per read, and
        # the queue subscribers (messages of channels with none skip broadcaster's queue and
        # listener; None: every message is queued).
        self.sinks: dict[str, tuple[BurstSink, ...]] = {}
        self.queued: dict[str, Any] | None = None
        self.connected = False
        self.on_reconnect: Callable[[], None] | None = None
        self.ping_after = _IDLE_PING_SECONDS  # a connection this quiet gets a PING
        self.dead_after = _DEAD_AFTER_SECONDS  # and one this quiet is dropped and reopened

    async def connect(self) -> None:
        self._listener = asyncio.create_task(self._pubsub_listener(), name="broker-listener")

    async def disconnect(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            try:
                await self._listener
            except asyncio.CancelledError:
                pass
        if self._proto is not None:
            self._proto.close()
        await self._conn.aclose()

    async def subscribe(self, channel: str) -> None:
        self._channels.add(channel)
        proto = self._proto
        if proto is not None:
            # Return once Redis has it: a message published after this call is delivered.
            try:
                proto.write("SUBSCRIBE", channel)
                await proto.call("PING")
            except (TimeoutError, RedisConnectionError):
                pass  # the listener resubscribes every channel when it reconnects
        self._ready.set()

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)
        if self._proto is not None:
            with contextlib.suppress(RedisConnectionError):  # closed: nothing to leave
                self._proto.write("UNSUBSCRIBE", channel)

    async def next_published(self) -> Event:
        event = await self._queue.get()
        if self._held:
            while self._held and not self._queue.full():
                self._queue.put_nowait(self._held.popleft())
            if not self._held and self._proto is not None:
                self._proto.resume()
        return event

    def _on_message(self, channel: bytes, data: bytes) -> None:
        try:
            name, message = channel.decode(), data.decode()
        except UnicodeDecodeError:
            metrics.BROKER_DROPPED.labels(reason="not_utf8").inc()
            logger.warning("broker: dropped a non-UTF-8 message")
            return
        sinks = self.sinks.get(name)
        if sinks is not None:
            for sink in sinks:
                burst = self._bursts.get(sink)
                if burst is None:
                    self._bursts[sink] = [(name, message)]
                else:
                    burst.append((name, message))
            if self.queued is not None and not self.queued.get(name):
                return
        event = Event(channel=name, message=message)
        if self._held or self._queue.full():
            # Push back: stop reading until broadcaster's listener makes room. What was already
            # read waits here (at most one read's worth); Redis holds the rest, up to its
            # pubsub output-buffer limit, past which it drops us and we resubscribe.
            self._held.append(event)
            if self._proto is not None:
                self._proto.pause()
        else:
            self._queue.put_nowait(event)

    def _on_read_end(self) -> None:
        """Hand every burst sink what this read brought it."""
        if not self._bursts:
            return
        bursts, self._bursts = self._bursts, {}
        for sink, messages in bursts.items():
            _hand_over(sink, messages)

    async def _open(self) -> _SubscriberProtocol:
        """Connect, authenticate and subscribe every channel; live from the first write on, so
        a `subscribe` that races this one is sent on the new connection too."""
        options = self._options
        loop = asyncio.get_running_loop()
        _, proto = await asyncio.wait_for(
            loop.create_connection(
                lambda: _SubscriberProtocol(self._on_message, self._on_read_end),
                options.get("host", "localhost"),
                int(options.get("port", 6379)),
                ssl=_ssl_context(options),
            ),
            _COMMAND_TIMEOUT_SECONDS,
        )
        self._proto = proto
        if self._held:
            proto.pause()  # broadcaster's listener has yet to take what the last one read
        sock = proto.transport.get_extra_info("socket") if proto.transport else None
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        password = options.get("password")
        if password:
            username = options.get("username")
            await proto.call("AUTH", *((username,) if username else ()), password)
        if self._channels:
            proto.write("SUBSCRIBE", *sorted(self._channels))
        await proto.call("PING")  # answered once the subscriptions are in place
        return proto

    async def _pubsub_listener(self) -> None:
        backoff = 0.1
        first = True
        while True:
            await self._ready.wait()
            if not self._channels:
                self._ready.clear()
                continue
            try:
                proto = await self._open()
                self.connected = True
                metrics.BROKER_CONNECTED.set(1)
                if not first:
                    logger.warning("broker: reconnected to Redis, %d channels", len(self._channels))
                    metrics.BROKER_RECONNECTS.inc()
                    if self.on_reconnect is not None:
                        self.on_reconnect()
                first = False
                backoff = 0.1
                await self._watch(proto)
                logger.warning("broker: Redis closed the connection; reconnecting")
            except asyncio.CancelledError:
                raise
            except (TimeoutError, RedisConnectionError, RedisTimeoutError, OSError) as exc:
                logger.warning("broker: Redis connection lost (%s); reconnecting", exc or "timeout")
            except Exception:
                logger.exception("broker: listener failed; reconnecting")
            finally:
                if self._proto is not None:
                    self._proto.close()
                    self._proto = None
            self.connected = False
            metrics.BROKER_CONNECTED.set(0)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX_SECONDS)

    async def _watch(self, proto: _SubscriberProtocol) -> None:
        """Return when the connection closes; ping it when quiet, drop it when silent."""
        pinged = False
        while True:
            done, _ = await asyncio.wait([proto.closed], timeout=min(1.0, self.ping_after / 2))
            if done:
                return
            quiet = time.monotonic() - proto.last_heard
            if quiet > self.dead_after:
                raise RedisTimeoutError(f"Redis silent for {quiet:.1f} s")
            if quiet > self.ping_after:
                if not pinged:
                    # The answer only refreshes `last_heard`; nobody awaits it.
                    with contextlib.suppress(RedisConnectionError):
                        proto.request("PING").add_done_callback(_consume)
                    pinged = True
            else:
                pinged = False


def _hand_over(sink: BurstSink, messages: list[tuple[str, str]]) -> None:
    """Call a burst sink; its bug must not take the subscription down."""
    try:
        sink(messages)
    except Exception:
        metrics.BROKER_DROPPED.labels(reason="sink_failed").inc(len(messages))
        logger.exception("broker: a burst subscriber failed")


def _consume(future: asyncio.Future[Any]) -> None:
    """Retrieve an unawaited future's outcome, so a lost connection logs no orphan error."""
    if not future.cancelled():
        future.exception()


def _ssl_context(options: dict[str, Any]) -> ssl.SSLContext | None:
    """TLS for rediss:// URLs, with redis-py's query options (ssl_cert_reqs, ssl_ca_certs,
    ssl_check_hostname)."""
    if options.get("connection_class") is not SSLConnection:
        return None
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    reqs = str(options.get("ssl_cert_reqs", "required")).lower()
    if reqs == "none":
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.verify_mode = ssl.CERT_OPTIONAL if reqs == "optional" else ssl.CERT_REQUIRED
        context.check_hostname = bool(options.get("ssl_check_hostname", True))
    return context


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
        self._sinks: dict[str, tuple[BurstSink, ...]] = {}
        if isinstance(backend, ResilientRedisBackend):
            backend.queued = self._subscribers
            backend.sinks = self._sinks

    @asynccontextmanager
    async def subscribe_sink(self, channels: list[str], sink: BurstSink) -> AsyncIterator[None]:
        """`sink` gets every message of `channels`, a read at a time, from the backend's read
        (ResilientRedisBackend only)."""
        backend = self._backend
        assert isinstance(backend, ResilientRedisBackend)
        taken: list[str] = []
        try:
            for channel in channels:
                async with self._locks.setdefault(channel, asyncio.Lock()):
                    sinks = self._sinks.get(channel, ())
                    if sink in sinks:
                        raise ValueError(f"this sink already takes {channel}")
                    first = not sinks and not self._subscribers.get(channel)
                    # Registered before SUBSCRIBE: nothing Redis sends after it is missed.
                    self._sinks[channel] = (*sinks, sink)
                    taken.append(channel)
                    if first:
                        await backend.subscribe(channel)
            yield
        finally:
            # Unregistered at once, before any await (a second cancellation cannot leave it).
            idle: list[str] = []
            for channel in taken:
                rest = tuple(s for s in self._sinks.get(channel, ()) if s != sink)
                if rest:
                    self._sinks[channel] = rest
                else:
                    self._sinks.pop(channel, None)
                    idle.append(channel)
            for channel in idle:
                async with self._locks[channel]:
                    if not self._sinks.get(channel) and not self._subscribers.get(channel):
                        await backend.unsubscribe(channel)

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
                        if not self._sinks.get(channel):
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
                        if not self._sinks.get(channel):
                            await self._backend.unsubscribe(channel)


class Broker:
    """Publish and subscribe on named channels, through broadcaster."""

    def __init__(self, url: str, *, queue_size: int = QUEUE_SIZE) -> None:
        self.url = url
        self._backend: ResilientRedisBackend | BoundedMemoryBackend
        if url.startswith(("redis://", "rediss://")):
            self._backend = ResilientRedisBackend(url, queue_size=queue_size)
        elif url.startswith("memory://"):
            self._backend = BoundedMemoryBackend(url, queue_size=queue_size)
        else:
            raise ValueError(f"unsupported BROADCAST_URL scheme: {url.split(':', 1)[0]}")
        self._broadcast = BoundedBroadcast(self._backend, queue_size=queue_size)

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

    @asynccontextmanager
    async def subscribe_bursts(self, channels: list[str], sink: BurstSink) -> AsyncIterator[None]:
        """Call `sink` with every message on `channels`, as (channel, message) pairs in order,
        a burst at a time: on Redis from the read that brought them (one read's worth), on the
        memory backend from a task draining a queue. `sink` must not block; what it raises is
        logged and counted, and the subscription goes on."""
        if isinstance(self._backend, ResilientRedisBackend):
            async with self._broadcast.subscribe_sink(channels, sink):
                yield
            return
        async with self.subscribe_many(channels) as receive:

            async def drain() -> None:
                while True:
                    _hand_over(sink, await receive())

            task = asyncio.create_task(drain(), name="broker-bursts")
            try:
                yield
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
