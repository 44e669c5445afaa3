"""The Redis subscriber connection: a bare asyncio protocol with hiredis's parser.

redis-py's PubSub spends about 170 µs of CPU per message in its coroutine stack (a coroutine,
a timeout scope and a dict per message; measured on the fan-out server with 200 ticks/s, see
docs/performance.md). Here every complete reply in a read is parsed by hiredis
and each message handed on at once, and the end of the read is signalled, so that the fan-out
can hand each subscriber a read's messages together."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError

from app.outcomes import consume

logger = logging.getLogger(__name__)

COMMAND_TIMEOUT_SECONDS = 2.0
_SUBSCRIBE_REPLIES = (b"subscribe", b"unsubscribe")


class SubscriberProtocol(asyncio.Protocol):
    """One Redis connection in subscribe mode. `on_message(channel, data)` gets each message
    as it is parsed, `on_read_end()` follows every read."""

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

    async def call(self, *args: str, timeout: float = COMMAND_TIMEOUT_SECONDS) -> Any:
        async with asyncio.timeout(timeout):  # not wait_for: on 3.11 it can lose a cancel
            reply = await self.request(*args)
        if isinstance(reply, hiredis.ReplyError):
            raise RedisConnectionError(f"Redis refused {args[0]}: {reply}")
        return reply

    def ping_unawaited(self) -> None:
        """PING a quiet connection: its answer only refreshes `last_heard`."""
        self.request("PING").add_done_callback(consume)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
