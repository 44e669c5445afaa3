"""Our two backends for `broadcaster.Broadcast`, on its public `BroadcastBackend` contract.

Both deliver to the `Fanout` (fanout.py) rather than through `next_published`: `Broadcast`
calls that from a listener task of its own and puts what it returns on its subscribers'
unbounded queues. Ours never returns, so that task only waits, until `Broadcast.disconnect`
cancels it (why delivery is ours: the package docstring)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import Any

from broadcaster import BroadcastBackend, Event
from redis.asyncio.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app import metrics
from app.backoff import Backoff
from app.broker.fanout import Fanout
from app.broker.redis_wire import COMMAND_TIMEOUT_SECONDS, SubscriberProtocol
from app.prices.store import ScriptedWrite
from app.redis_client import create_redis
from app.redis_commands import CommandConnection, Script, ssl_context

logger = logging.getLogger(__name__)

QUEUE_SIZE = 10_000
IDLE_PING_SECONDS = 5.0
DEAD_AFTER_SECONDS = 15.0


async def _no_events() -> Event:
    """`next_published` of our backends: delivery goes through the fan-out instead."""
    never: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
    return await never


def _set_connected(connected: bool) -> None:
    metrics.BROKER_CONNECTED.set(1 if connected else 0)


class BoundedMemoryBackend(BroadcastBackend):
    """`memory://`: one process. Published messages of subscribed channels wait in one
    bounded queue (a full one makes `publish` wait: the publisher is in this process), and a
    task hands the fan-out everything waiting at once, as a read from Redis would."""

    def __init__(self, fanout: Fanout, *, queue_size: int = QUEUE_SIZE) -> None:
        self._fanout = fanout
        self._queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=queue_size)
        self._channels: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self.connected = False

    async def connect(self) -> None:
        self._task = asyncio.create_task(self._deliver(), name="broker-memory")
        self.connected = True
        _set_connected(True)

    async def disconnect(self) -> None:
        self.connected = False
        _set_connected(False)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def subscribe(self, channel: str) -> None:
        self._channels.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)

    async def publish(self, channel: str, message: Any) -> None:
        if channel in self._channels:  # as Redis does, nobody listening: nothing kept
            await self._queue.put(Event(channel=channel, message=message))

    async def publish_many(self, messages: list[tuple[str, str]]) -> None:
        for channel, message in messages:
            await self.publish(channel, message)

    async def next_published(self) -> Event:
        return await _no_events()

    async def _deliver(self) -> None:
        queue, fanout = self._queue, self._fanout
        while True:
            event = await queue.get()
            fanout.message(event.channel, event.message)
            while not queue.empty():
                event = queue.get_nowait()
                fanout.message(event.channel, event.message)
            fanout.read_end()


# ARGV: channel, then that channel's messages joined by newlines, for each run of messages
# on one channel in turn (a message with a newline of its own goes alone: it is split on
# nothing, see `_runs`), rather than two arguments a message: redis-py packs each
# argument in Python, which was a tenth of the producer's CPU per tick. Three a run here.
_PUBLISH_MANY_LUA = """
local published = 0
for i = 1, #ARGV, 3 do
  local channel, joined = ARGV[i], ARGV[i + 1]
  if ARGV[i + 2] == '1' then
    redis.call('PUBLISH', channel, joined)
    published = published + 1
  else
    local from = 1
    while true do
      local to = string.find(joined, '\\n', from, true)
      if to == nil then
        redis.call('PUBLISH', channel, string.sub(joined, from))
        published = published + 1
        break
      end
      redis.call('PUBLISH', channel, string.sub(joined, from, to - 1))
      published = published + 1
      from = to + 1
    end
  end
end
return published
"""


# After a store write (app/prices/store.py's `ScriptedWrite`, run first as a function): the
# messages of each of its runs, in order, as ARGV after the write's: channel, then that run's
# messages joined by newlines (a tick's JSON holds none), each run's first `skipped[i]`
# left out (their seq was kept already: published before); the last ARGV is where they
# start (a write's own arguments are as many as its runs need: one script for them all).
# Refused by the store (an error reply), nothing is published.
_PUBLISH_WRITTEN_LUA = """
local function write()
{write}
end
local skipped = write()
if skipped.err then
  return skipped
end
local run = 1
for i = tonumber(ARGV[#ARGV]), #ARGV - 1, 2 do
  local channel, joined, skip = ARGV[i], ARGV[i + 1], skipped[run]
  local from, n = 1, 0
  while from do
    local to = string.find(joined, '\\n', from, true)
    if n >= skip then
      redis.call('PUBLISH', channel, string.sub(joined, from, to and to - 1 or -1))
    end
    n = n + 1
    from = to and to + 1
  end
  run = run + 1
end
return skipped
"""


def _runs(messages: list[tuple[str, str]]) -> list[str]:
    """The arguments of `_PUBLISH_MANY_LUA`: (channel, joined messages, whole) per run of
    messages on one channel, in order; `whole` "1" for a message that holds a newline and
    so cannot be joined with others (never a tick: JSON text escapes its newlines)."""
    args: list[str] = []
    channel: str | None = None
    run: list[str] = []
    for name, message in messages:
        if "\n" in message:
            if run:
                args += (channel, "\n".join(run), "0")  # type: ignore[arg-type]
                run = []
            args += (name, message, "1")
            channel = None
            continue
        if name != channel and run:
            args += (channel, "\n".join(run), "0")  # type: ignore[arg-type]
            run = []
        channel = name
        run.append(message)
    if run:
        args += (channel, "\n".join(run), "0")  # type: ignore[arg-type]
    return args


class ResilientRedisBackend(BroadcastBackend):
    """Publishes with redis-py (`publish`) and on a lean connection (`publish_many`, the
    producer's: app/redis_commands.py); subscribes on a connection of its own (redis_wire.py)
    that it subscribes before it listens, reconnects with jittered backoff and resubscribes,
    pings when quiet and drops when silent, and that drops undecodable payloads. Each read's
    messages go to the fan-out from the read itself: no queue, no task switch."""

    def __init__(
        self,
        url: str,
        fanout: Fanout,
        *,
        ping_after: float = IDLE_PING_SECONDS,
        dead_after: float = DEAD_AFTER_SECONDS,
    ) -> None:
        self._conn = create_redis(url)  # publishing; subscribing has a connection of its own
        # Opened by the first `publish_many`: the producer's only.
        self._commands = CommandConnection.from_url(url)
        self._publish_many = Script(_PUBLISH_MANY_LUA)
        self._written_scripts: dict[str, Script] = {}  # `publish_written`'s, by write
        self._options: dict[str, Any] = dict(parse_url(url))
        self._fanout = fanout
        self._wanted = asyncio.Event()  # a channel was subscribed: time to connect
        self._channels: set[str] = set()
        self._proto: SubscriberProtocol | None = None  # the live subscribed connection
        self._listener: asyncio.Task[None] | None = None
        self._ping_after = ping_after  # a connection this quiet gets a PING
        self._dead_after = dead_after  # and one this quiet is dropped and reopened
        self.connected = False

    async def connect(self) -> None:
        self._listener = asyncio.create_task(self._listen(), name="broker-listener")

    async def disconnect(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        if self._proto is not None:
            self._proto.close()
        self.connected = False
        _set_connected(False)
        await self._commands.close()
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
        self._wanted.set()

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)
        if self._proto is not None:
            with contextlib.suppress(RedisConnectionError):  # closed: nothing to leave
                self._proto.write("UNSUBSCRIBE", channel)

    async def publish(self, channel: str, message: Any) -> None:
        await self._conn.publish(channel, message)

    async def publish_many(self, messages: list[tuple[str, str]]) -> None:
        # One command for the lot: a pipeline of PUBLISHes costs redis-py ~15 µs of Python a
        # command to pack (measured with py-spy on the producer, bench.ingest), one EVALSHA
        # of all of them a fraction of that; Redis runs them in order either way. On the lean
        # connection: redis-py's own script call is ~117 µs of CPU, this one ~36.
        await self._commands.run_script(self._publish_many, (), _runs(messages))

    async def publish_written(
        self, write: ScriptedWrite, runs: list[tuple[str, list[str]]]
    ) -> list[int]:
        """Run `write` and publish each of its runs' messages, one script on the store's
        write connection (the producer's; lean, app/redis_commands.py): one command, one
        answer. Sent before the first await, so calls run in Redis in call order, behind
        every write sent before. `write`'s outcome (its error raised)."""
        body = write.lua
        script = self._written_scripts.get(body)
        if script is None:
            script = self._written_scripts[body] = Script(_PUBLISH_WRITTEN_LUA.format(write=body))
        args = list(write.args)
        for channel, messages in runs:
            joined = "\n".join(messages)
            if joined.count("\n") != len(messages) - 1:
                raise ValueError("a message published after a write holds a newline")
            args += (channel, joined)
        args.append(len(write.args) + 1)
        sent = write.commands.send_script(script, write.keys, args)
        return await write.commands.answer(sent)  # type: ignore[no-any-return]

    async def next_published(self) -> Event:
        return await _no_events()

    def _on_message(self, channel: bytes, data: bytes) -> None:
        try:
            name, message = channel.decode(), data.decode()
        except UnicodeDecodeError:
            metrics.BROKER_DROPPED.labels(reason="not_utf8").inc()
            logger.warning("broker: dropped a non-UTF-8 message")
            return
        self._fanout.message(name, message)

    async def _open(self) -> SubscriberProtocol:
        """Connect, authenticate and subscribe every channel; live from the first write on, so
        a `subscribe` that races this one is sent on the new connection too."""
        options = self._options
        loop = asyncio.get_running_loop()
        # not wait_for: on 3.11 it can lose a cancel (app/redis_client.py)
        async with asyncio.timeout(COMMAND_TIMEOUT_SECONDS):
            _, proto = await loop.create_connection(
                lambda: SubscriberProtocol(self._on_message, self._fanout.read_end),
                options.get("host", "localhost"),
                int(options.get("port", 6379)),
                ssl=ssl_context(options),
            )
        self._proto = proto
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

    async def _listen(self) -> None:
        """Keep a subscribed connection open while any channel is wanted, whatever Redis does."""
        backoff = Backoff(base=0.1, cap=5.0, healthy_after=10.0)
        first = True
        while True:
            await self._wanted.wait()
            if not self._channels:
                self._wanted.clear()
                continue
            opened = None
            try:
                proto = await self._open()
                opened = time.monotonic()
                self.connected = True
                _set_connected(True)
                if not first:
                    logger.warning("broker: reconnected to Redis, %d channels", len(self._channels))
                    metrics.BROKER_RECONNECTS.inc()
                first = False
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
            _set_connected(False)
            # A connection that lasted 10 s starts the delays over; one Redis drops at once (an
            # output-buffer limit, a proxy) is retried ever more slowly, not every 0.1 s.
            await backoff.sleep(ran_for=0.0 if opened is None else time.monotonic() - opened)

    async def _watch(self, proto: SubscriberProtocol) -> None:
        """Return when the connection closes; ping it when quiet, drop it when silent."""
        pinged = False
        while True:
            done, _ = await asyncio.wait([proto.closed], timeout=min(1.0, self._ping_after / 2))
            if done:
                return
            quiet = time.monotonic() - proto.last_heard
            if quiet > self._dead_after:
                raise RedisTimeoutError(f"Redis silent for {quiet:.1f} s")
            if quiet > self._ping_after:
                if not pinged:
                    with contextlib.suppress(RedisConnectionError):
                        proto.ping_unawaited()
                    pinged = True
            else:
                pinged = False
