"""A lean Redis command connection: a bare asyncio protocol with hiredis's parser, for the
few calls that run per batch on the producer's hot path (the fenced store write, the publish).

redis-py spends ~117 µs of CPU on one script call (its connection pool, a coroutine stack, a
timeout scope, argument packing in Python); this spends ~36 (both measured in a loop on this
machine kind, docs/performance.md). What it keeps of redis-py is its exception types, so
callers handle failures as before: a lost or refused connection is `ConnectionError`, no
answer in time `TimeoutError`, an error reply `ResponseError` (or its subclass for the code).

Commands reach Redis in the order they are called, including while the connection is being
(re)opened (they wait in order, then go behind the handshake), and answers come back in that
order: a caller may send a command and await its answer later, with more sent meanwhile
(pipelining). A script goes as EVALSHA; each new connection loads the scripts called so far
first. One Redis forgot meanwhile (SCRIPT FLUSH) is answered NOSCRIPT, and sent again as EVAL;
the calls sent after it have run already (calls of that script were refused too, and are sent
again in their turn), and what is called from then on waits until they are answered: the
scripts still run in call order (unless another client loaded the script in between, which
would let a later call of it run first). A connection that fails fails every command awaiting
an answer on it; the next call opens a new one. A call not answered within `timeout` drops the
connection, so nothing later is matched against a stale answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
from collections import deque
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import SSLConnection, parse_url
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app.outcomes import consume

CONNECT_TIMEOUT_SECONDS = 2.0
# As the redis-py clients' socket timeout (app/redis_client.py).
COMMAND_TIMEOUT_SECONDS = 5.0

Arg = bytes | str | int
_ERRORS: dict[str, type[RedisError]] = {
    "NOSCRIPT": NoScriptError,
    "NOAUTH": AuthenticationError,
    "WRONGPASS": AuthenticationError,
    "READONLY": ReadOnlyError,
    "OOM": OutOfMemoryError,
    "LOADING": BusyLoadingError,
}


class Script:
    """A Lua script, called by its SHA1 (its text only when Redis does not know it)."""

    def __init__(self, body: str) -> None:
        self.body = body.encode()
        self.sha = hashlib.sha1(self.body).hexdigest().encode()


def pack(args: Sequence[Arg]) -> bytes:
    """One command in RESP. (A third cheaper than formatting each argument into its frame: a
    large argument, the batch's JSON, is not copied twice.)"""
    parts = [b"*%d\r\n" % len(args)]
    append = parts.append
    for arg in args:
        raw = (
            arg.encode() if isinstance(arg, str) else arg if isinstance(arg, bytes) else b"%d" % arg
        )
        append(b"$%d\r\n" % len(raw))
        append(raw)
        append(b"\r\n")
    return b"".join(parts)


def reply_error(reply: hiredis.ReplyError) -> RedisError:
    """redis-py's exception for an error reply."""
    text = str(reply)
    return _ERRORS.get(text.split(" ", 1)[0], ResponseError)(text)


class _Waiting:
    """A command awaiting its answer: the future it goes to, and what to send instead if the
    answer is NOSCRIPT (the EVAL of an EVALSHA), packed only then: packing it with every call
    cost as much again as the EVALSHA itself (the batch's JSON, the script's text)."""

    __slots__ = ("future", "instead")

    def __init__(self, future: asyncio.Future[Any], instead: Sequence[Arg] | None) -> None:
        self.future = future
        self.instead = instead


class _CommandProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self._waiting: deque[_Waiting] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost = False
        # After a NOSCRIPT answer: how many commands sent before its EVAL are still to be
        # answered, and what is called meanwhile, sent once they are (so behind their EVALs).
        self._unsettled = 0
        self._held: list[tuple[bytes, _Waiting]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, command: bytes, waiting: _Waiting) -> None:
        if self._unsettled:
            self._held.append((command, waiting))
            return
        self._write(command, waiting)

    def _write(self, command: bytes, waiting: _Waiting) -> None:
        assert self.transport is not None
        self.transport.write(command)
        self._waiting.append(waiting)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        try:
            while (reply := reader.gets()) is not False:
                waiting = self._waiting.popleft()
                if isinstance(reply, hiredis.ReplyError):
                    if waiting.instead is not None and str(reply).startswith("NOSCRIPT"):
                        self._send_instead(waiting)
                        continue
                    if not waiting.future.done():
                        waiting.future.set_exception(reply_error(reply))
                elif not waiting.future.done():
                    waiting.future.set_result(reply)
                self._settle_one()
        except (hiredis.ProtocolError, IndexError) as exc:  # garbage, or an answer unasked
            self._fail(RedisConnectionError(f"Redis sent what cannot be read ({exc!r})"))
            self.close()

    def _send_instead(self, waiting: _Waiting) -> None:
        """EVAL what Redis answered NOSCRIPT to. What was sent after the EVALSHA ran already
        (a call of the same script was refused too, and is sent again in its turn); what is
        called from now on waits until those are answered, so it runs after every EVAL."""
        assert waiting.instead is not None
        settling = self._unsettled > 0
        if settling:
            self._unsettled -= 1
        self._write(pack(waiting.instead), _Waiting(waiting.future, None))
        if not settling:
            self._unsettled = len(self._waiting) - 1  # those sent before the EVAL
        elif not self._unsettled:
            self._release_held()

    def _settle_one(self) -> None:
        if self._unsettled:
            self._unsettled -= 1
            if not self._unsettled:
                self._release_held()

    def _release_held(self) -> None:
        held, self._held = self._held, []
        for command, waiting in held:
            self._write(command, waiting)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._fail(RedisConnectionError(f"connection to Redis lost ({exc or 'closed'})"))

    def _fail(self, error: RedisError) -> None:
        held, self._held = self._held, []
        for _, waiting in held:
            _fail(waiting.future, error)
        while self._waiting:
            _fail(self._waiting.popleft().future, error)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.lost = True


class CommandConnection:
    """One Redis connection for commands, opened on first use and reopened after a failure.
    `options` are redis-py's connection options (`parse_url`'s, or a client pool's)."""

    def __init__(self, options: dict[str, Any], *, timeout: float = COMMAND_TIMEOUT_SECONDS):
        self._options = options
        self._timeout = timeout
        self._proto: _CommandProtocol | None = None
        self._queued: list[tuple[bytes, _Waiting]] = []  # called while the connection opens
        self._scripts: dict[bytes, bytes] = {}  # loaded by each new connection first
        self._opening: asyncio.Task[None] | None = None

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> CommandConnection:
        return cls(dict(parse_url(url)), **kwargs)

    @classmethod
    def like(cls, client: Redis, **kwargs: Any) -> CommandConnection:
        """To the Redis `client` talks to, with its credentials, database and TLS."""
        pool = client.connection_pool
        return cls({**pool.connection_kwargs, "connection_class": pool.connection_class}, **kwargs)

    def send(
        self, args: Sequence[Arg], *, instead: Sequence[Arg] | None = None
    ) -> asyncio.Future[Any]:
        """Send a command now (or as soon as the connection is open, in call order): the future
        gets its answer. `instead`: sent if the answer is NOSCRIPT."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        waiting = _Waiting(future, instead)
        proto = self._proto
        if proto is not None and not proto.lost:
            proto.send(pack(args), waiting)
            return future
        self._queued.append((pack(args), waiting))
        if self._opening is None:
            self._opening = asyncio.create_task(self._open(), name="redis-commands-open")
        return future

    def send_script(
        self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]
    ) -> asyncio.Future[Any]:
        """Run `script` (EVALSHA, EVAL if Redis does not know it): `send`'s future."""
        self._scripts.setdefault(script.sha, script.body)
        tail = (len(keys), *keys, *args)
        return self.send(("EVALSHA", script.sha, *tail), instead=("EVAL", script.body, *tail))

    async def call(self, *args: Arg) -> Any:
        return await self.answer(self.send(args))

    async def run_script(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        return await self.answer(self.send_script(script, keys, args))

    async def answer(self, future: asyncio.Future[Any]) -> Any:
        """The answer `future` gets (its error raised), within the timeout; past it the
        connection is dropped and TimeoutError raised."""
        if not future.done():
            try:
                async with asyncio.timeout(self._timeout):
                    await future
            except TimeoutError:
                self._drop(self._proto)
                raise RedisTimeoutError(f"Redis did not answer within {self._timeout} s") from None
        return future.result()

    async def close(self) -> None:
        if self._opening is not None:
            self._opening.cancel()
            await asyncio.gather(self._opening, return_exceptions=True)
        queued, self._queued = self._queued, []
        for _, waiting in queued:
            _fail(waiting.future, RedisConnectionError("connection to Redis closed"))
        self._drop(self._proto)

    def _drop(self, proto: _CommandProtocol | None) -> None:
        if proto is not None:
            proto.close()
        if proto is self._proto:
            self._proto = None

    async def _open(self) -> None:
        """Connect, then send the handshake and what waited, in that order."""
        options = self._options
        loop = asyncio.get_running_loop()
        try:
            try:
                if options.get("path"):
                    connecting = loop.create_unix_connection(_CommandProtocol, options["path"])
                else:
                    connecting = loop.create_connection(
                        _CommandProtocol,
                        options.get("host", "localhost"),
                        int(options.get("port", 6379)),
                        ssl=ssl_context(options),
                    )
                # not wait_for: on 3.11 it can lose a cancel (app/redis_client.py)
                async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                    _, proto = await connecting
            except (OSError, TimeoutError) as exc:
                error = RedisConnectionError(f"cannot connect to Redis ({exc or 'timeout'})")
                queued, self._queued = self._queued, []
                for _, waiting in queued:
                    _fail(waiting.future, error)
                return
            sock = proto.transport.get_extra_info("socket") if proto.transport else None
            if sock is not None and sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            handshake = []
            password, username = options.get("password"), options.get("username")
            if password:
                handshake.append(("AUTH", *((username,) if username else ()), password))
            if int(options.get("db") or 0):
                handshake.append(("SELECT", int(options["db"])))
            # So that a Redis that restarted answers no NOSCRIPT: that is for a SCRIPT FLUSH.
            handshake += [("SCRIPT", "LOAD", body) for body in self._scripts.values()]
            for step in handshake:
                # An error answer here fails what follows too (NOAUTH, or the wrong database
                # refused): nothing runs where it should not.
                proto.send(pack(step), _Waiting(_ignored_future(loop), None))
            queued, self._queued = self._queued, []
            for command, waiting in queued:
                proto.send(command, waiting)
            self._proto = proto
        finally:
            self._opening = None


def _ignored_future(loop: asyncio.AbstractEventLoop) -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = loop.create_future()
    future.add_done_callback(consume)
    return future


def _fail(future: asyncio.Future[Any], error: RedisError) -> None:
    """Fail `future` unless it is done; unawaited, that logs nothing."""
    if not future.done():
        future.set_exception(error)
        future.add_done_callback(consume)


def ssl_context(options: dict[str, Any]) -> ssl.SSLContext | None:
    """TLS for rediss:// URLs, with redis-py's query options (ssl_cert_reqs, ssl_ca_certs,
    ssl_check_hostname), as redis-py's `parse_url` reads them."""
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
