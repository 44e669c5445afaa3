"""uvicorn's websockets-sansio protocol, plus two ASGI extensions: `pricefeed.frames`, a way to
write already-encoded WebSocket frames straight to the connection's transport (the app sees it
only as `app.frames.FrameWriter`); and `pricefeed.control`, through which the app's message
budget counts the client's pings and pongs (`app.frames.count_control_frames`), which
websockets answers by itself: past the budget, or with its pongs piling up unread, the client
is closed here.

The hub encodes each tick's frame once and writes those same bytes to every subscriber: no
per-connection encoding, no task switch, no ASGI message per tick. The extension is offered
only when the connection negotiated no extension (a compressed connection needs its frames
compressed per connection); without it the app falls back to plain ASGI sends, so the app
still runs under any ASGI server.

Select it with `WS_IMPL=fast` (the default). This module reaches into uvicorn's and websockets'
internals (private attributes of `WebSocketsSansIOProtocol`, `Protocol.parse`): only
app/server/guard.py imports it, and only for the versions it was tested with; otherwise the
service runs uvicorn's stock protocol.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from asyncio import BaseTransport
from collections.abc import Callable, Iterable
from typing import Any, cast

import httptools
from uvicorn._types import ASGIReceiveCallable, ASGISendCallable, ASGISendEvent, Scope
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import Protocol, State

from app.errors import CloseCode
from app.frames import CONTROL_EXTENSION, EXTENSION, TRANSPORT_EXTENSION, Transport, frame_writer
from app.server.lean import LeanEvent, LeanQueue

logger = logging.getLogger(__name__)

HIGH_WATER_BYTES = 64 * 1024  # past this many unsent bytes, the app queues (and conflates) instead
# Past this many unsent bytes after answering a ping, the client is closed 1013 (it does not read
# what it asked for). The app never gets there: it stops writing at HIGH_WATER_BYTES and adds at
# most one bounded outbox drain; only pongs, which websockets answers by itself, could.
MAX_UNSENT_BYTES = 4 * HIGH_WATER_BYTES
_CONTROL_OPCODES = (Opcode.PING, Opcode.PONG)


class SocketFrameWriter:
    """`app.frames.FrameWriter` for one connection of this protocol: writes whole frames, in
    order with everything else it sends.

    The hub may also write to `transport` itself, in a loop over many connections, while
    `on_blocked` is set: the protocol calls it the moment such writes must stop (the transport
    paused writing, or the app is sending its close frame). Anything that closes the transport
    shows in `transport.is_closing()`, which those writers check."""

    __slots__ = ("_protocol", "on_blocked")

    def __init__(self, protocol: PricefeedWebSocketProtocol) -> None:
        self._protocol = protocol
        self.on_blocked: Callable[[], None] | None = None

    @property
    def transport(self) -> Transport:
        """The connection's own transport (uvicorn writes through a watched stand-in)."""
        return self._protocol.raw_transport

    def duplicate_fd(self) -> int | None:
        """A descriptor of its own for the connection's socket, for the hub to send() to
        directly while nothing else writes (see `WatchedTransport`); None when the connection
        cannot be written that way (TLS, no socket, out of descriptors) or its transport holds
        unsent bytes, which must go first. The caller closes it.

        A descriptor of its own, not the transport's: a transport closed under us frees its
        number for the next accepted connection, and a send() to that number would land in a
        stranger's stream."""
        transport = self.transport
        if (
            transport.is_closing()
            or transport.get_write_buffer_size()
            or transport.get_extra_info("sslcontext") is not None
        ):
            return None
        sock = transport.get_extra_info("socket")
        if sock is None:
            return None
        try:
            return os.dup(sock.fileno())
        except OSError:  # EMFILE: this connection stays on the transport's write path
            return None

    def blocked(self) -> None:
        callback = self.on_blocked
        if callback is not None:
            self.on_blocked = None
            callback()

    def keeping_up(self) -> bool:
        """Open, and its unsent bytes below the high-water mark."""
        p = self._protocol
        transport = p.raw_transport
        return not (p.close_sent or p.disconnected or transport.is_closing()) and (
            transport.get_write_buffer_size() <= HIGH_WATER_BYTES
        )

    async def wait_writable(self) -> None:
        """Until the transport's buffer drained below its low-water mark."""
        await self._protocol.writable.wait()

    def write(self, data: bytes) -> bool:
        """Write regardless of the buffer (the caller checked `keeping_up` or waited)."""
        p = self._protocol
        # uvicorn sends some close frames (a peer's close, shutdown) without `close_sent`,
        # then closes the transport: nothing may follow them.
        transport = p.raw_transport
        if p.close_sent or p.disconnected or transport.is_closing():
            return False
        transport.write(data)
        return True


class WatchedTransport(asyncio.Transport):
    """What uvicorn's protocol writes through: the connection's transport, plus a call to
    `on_other_write` whenever a write may no longer be followed by the hub's direct ones.

    The hub's fast path sends frames to the socket itself (`SocketFrameWriter.duplicate_fd`), which
    is only in order while the transport holds no unsent bytes and has sent no close frame. So
    a write that leaves bytes buffered (a pong behind a full socket) and any close, abort or
    EOF call it first; a write that went out whole (a keepalive ping) does not."""

    __slots__ = ("_transport", "_on_other_write")

    def __init__(self, transport: Transport, on_other_write: Callable[[], None]) -> None:
        super().__init__()
        self._transport = transport
        self._on_other_write = on_other_write

    def write(self, data: bytes | bytearray | memoryview) -> None:
        transport = self._transport
        transport.write(data)
        if transport.get_write_buffer_size():
            self._on_other_write()

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.write(b"".join(list_of_data))

    def write_eof(self) -> None:
        self._on_other_write()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def close(self) -> None:
        self._on_other_write()
        self._transport.close()

    def abort(self) -> None:
        self._on_other_write()
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()


class PricefeedWebSocketProtocol(WebSocketsSansIOProtocol):
    # WS_SEND_BUFFER_BYTES (0: the kernel's autotuning); uvicorn instantiates the class.
    send_buffer_bytes = 0

    @classmethod
    def configure(cls, *, send_buffer_bytes: int) -> None:
        cls.send_buffer_bytes = send_buffer_bytes

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Thousands of these live for hours: lighter stand-ins for two asyncio primitives.
        self.queue = LeanQueue()  # type: ignore[assignment]
        self.writable = LeanEvent()  # type: ignore[assignment]
        self.writable.set()
        # The app's budget for the client's pings and pongs (app.frames.count_control_frames).
        self.control: dict[str, Any] | None = None

    def connection_made(self, transport: BaseTransport) -> None:
        super().connection_made(transport)
        self.raw_transport: Transport = self.transport
        self.transport = WatchedTransport(self.raw_transport, self._leave_fast_path)
        # pause_writing() exactly where SocketFrameWriter.keeping_up() turns false.
        self.raw_transport.set_write_buffer_limits(high=HIGH_WATER_BYTES)
        sock = transport.get_extra_info("socket")
        if self.send_buffer_bytes and sock is not None:
            # A bounded kernel buffer: a stuck reader is noticed (and conflated, then closed)
            # within seconds instead of after megabytes, and 5,000 connections cannot pin
            # gigabytes of kernel memory.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.send_buffer_bytes)

    def _frame_writer(self) -> SocketFrameWriter | None:
        scope = getattr(self, "scope", None)  # set once the handshake request was read
        return cast(SocketFrameWriter | None, frame_writer(scope) if scope is not None else None)

    def _leave_fast_path(self) -> None:
        """Stop the hub's direct writes to this connection (it rejoins when it qualifies)."""
        writer = self._frame_writer()
        if writer is not None:
            writer.blocked()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._leave_fast_path()

    def eof_received(self) -> None:
        self._leave_fast_path()  # the transport closes once this returns
        super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave_fast_path()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """uvicorn's shutdown, closing with 1001 (going away, reconnect) instead of 1012.

        uvicorn calls this on every connection once it stops serving. The app's own signal
        hook (app/shutdown.py) normally closes streams with 1001 first; this makes that code
        certain when uvicorn gets there first, or shuts down without a signal."""
        if self.close_sent or not self.handshake_complete:
            super().shutdown()  # an ongoing close, or a handshake still in progress (500)
            return
        self.stop_keepalive()
        self.queue.put_nowait({"type": "websocket.disconnect", "code": CloseCode.GOING_AWAY})
        self.conn.send_close(CloseCode.GOING_AWAY, "server going away")
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.transport.close()  # the watched transport takes it off the hub's direct path

    async def send(self, message: ASGISendEvent) -> None:
        if message["type"] != "websocket.accept":
            self._leave_fast_path()  # nothing may go ahead of it, and no frame after a close
        if message["type"] == "websocket.close" and self.handshake_complete:
            # A close must not wait for a stuck reader to drain the buffer (uvicorn's send
            # waits for writable first): queue the close frame behind what is buffered...
            self.writable.set()
            await super().send(message)
            # ...and if the peer never takes it, abort rather than wait forever to flush.
            if self.close_timer is not None:
                self.close_timer.cancel()
                self.close_timer = self.loop.call_later(self.close_timeout, self.transport.abort)
            return
        await super().send(message)
        if message["type"] == "websocket.accept":
            # The handshake request and response are not needed again: ~3 KB per connection.
            self.request = self.response = None  # type: ignore[assignment]

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:
            self.control = scope["extensions"][CONTROL_EXTENSION] = {"allow": None}
            if not self.conn.extensions:
                scope["extensions"][EXTENSION] = {"writer": SocketFrameWriter(self)}
        self._forget_handshake_request()

    # -- the client's pings and pongs: counted, and answered only while it reads them

    def handle_events(self) -> None:
        """Count the pings and pongs of this read against the app's message budget before any
        is answered (websockets has queued every pong already, and uvicorn's first
        `handle_ping` writes them all): over it, none is, and the client is closed 1008."""
        if not self.close_sent and self.control is not None:
            allow = self.control["allow"]
            frames = sum(
                1
                for event in self.conn.events
                if isinstance(event, Frame) and event.opcode in _CONTROL_OPCODES
            )
            if allow is not None and frames and not all(allow() for _ in range(frames)):
                self._refuse(CloseCode.POLICY, "too many messages per second")
        super().handle_events()

    def handle_ping(self) -> None:
        """Answered unless this side is closing; a client that does not read its pongs is
        closed 1013 (uvicorn would pile them up: 3,000,000 pings once held 362 MB)."""
        if self.close_sent:
            self.conn.data_to_send()  # websockets answers pings while closing too; we do not
            return
        super().handle_ping()
        if self.raw_transport.get_write_buffer_size() > MAX_UNSENT_BYTES:
            self._refuse(CloseCode.TRY_LATER, "reader too slow")

    def handle_pong(self, event: Frame) -> None:
        if not self.close_sent:
            super().handle_pong(event)

    def _refuse(self, code: int, reason: str) -> None:
        """Close from here, at once: nothing more is answered or read (the transport's close
        stops reading), the close frame goes out behind what is buffered, the app gets the
        disconnect, and a client that never takes it is aborted after `close_timeout`."""
        self._leave_fast_path()
        conn = self.conn
        pending = conn.data_to_send()  # pongs of this read not yet written
        if conn.state is State.OPEN:
            conn.fail(code, reason)
            pending = conn.data_to_send()
        # else the client's own close came in this read: its echo is in `pending`
        self.transport.write(b"".join(pending))
        self.close_sent = True
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.transport.close()
        if self.close_timer is not None:
            self.close_timer.cancel()
        self.close_timer = self.loop.call_later(self.close_timeout, self.transport.abort)

    def _forget_handshake_request(self) -> None:
        """websockets' server-side parser is one generator for the whole connection: the
        handshake part keeps the parsed request (headers, and the path with its `?token=`) in
        a local for as long as the connection lives, ~1.8 KB each. Past the handshake it only
        parses frames, so when it is waiting for the first one with nothing buffered, a fresh
        frame parser is the same thing without the request."""
        conn = self.conn
        reader = conn.reader
        if conn.state is not State.CONNECTING or reader.buffer or reader.eof:
            return
        parser = Protocol.parse(conn)
        next(parser)  # to where the old one waits: for the first frame's bytes
        conn.parser = parser


class TransportInScope:
    """For uvicorn's HTTP protocols: every request's scope carries the connection's transport
    (`app.frames.request_transport`), so an SSE response can bound its socket's send buffer
    and abort a stuck reader, as the WebSocket side does."""

    app: Any
    transport: Transport

    def connection_made(self, transport: BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._inner_app = self.app
        self.app = self._app_with_transport  # uvicorn calls `self.app` for each request

    async def _app_with_transport(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        extensions: dict[str, Any] = cast(dict[str, Any], scope).setdefault("extensions", {})
        extensions[TRANSPORT_EXTENSION] = {"transport": self.transport}
        await self._inner_app(scope, receive, send)


# A request's head is read whole before anything else happens, so it is bounded: past these,
# the client gets 414 or 431 and the connection closes, before any body is read.
MAX_URL_BYTES = 8 * 1024  # the request target (path and query): longer is 414
MAX_HEADER_BYTES = 16 * 1024  # the headers, names and values together: more is 431
# httptools gathers an unfinished header inside itself (no callback until it ends), so bytes are
# also counted as they arrive: a head this long without its end is 431 too.
_MAX_HEAD_BYTES = MAX_URL_BYTES + MAX_HEADER_BYTES
_PROBE_PATH = b"/healthz"  # answered at the connection cap too (see `_over_cap`)
_LINGER_SECONDS = 2.0  # a refused connection is read (and discarded) this long, then closed
_CAP_LOG_SECONDS = 10.0  # one log line per this long while requests are refused at the cap


class _Refused(Exception):
    """Raised from a parser callback once the request was answered: stops the parser."""


class PricefeedHTTPProtocol(TransportInScope, HttpToolsProtocol):
    """uvicorn's httptools protocol (what its `auto` picks here), with the transport in scope,
    and limits on what a client can hold before its request reaches the app:

    - a request head (request line and headers) longer than the limits above is answered 414
      or 431 while it is being read (httptools itself has no limit: one never-finished 512 MB
      header once grew the process to ~1 GB);
    - a head not complete `header_timeout` seconds after the connection was made (or after the
      first byte of a keep-alive connection's next request) is answered 408, and a connection
      that sent nothing at all by then is closed: idle and half-finished sockets do not stay;
    - past `max_connections` open connections on this instance, a request (a WebSocket
      upgrade too) is answered 503, except `GET /healthz`: the instance is alive, and a
      probe that failed here would restart it and drop every stream. `/readyz` is refused,
      so a load balancer sends new clients elsewhere.

    Each answer is a small JSON body `{"detail", "code"}` with `Connection: close`. The cost
    per connection is a counter and a timer; nothing is done per body byte."""

    header_timeout = 10.0  # WS_HANDSHAKE_TIMEOUT_SECONDS
    max_connections: int | None = None  # MAX_OPEN_CONNECTIONS
    _cap_logged_at = float("-inf")  # the last cap log line, for all connections
    _cap_refused = 0  # requests refused at the cap since that line

    @classmethod
    def configure(cls, *, header_timeout: float, max_connections: int | None) -> None:
        cls.header_timeout = header_timeout
        cls.max_connections = max_connections

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limit_concurrency = None  # uvicorn's own cap: replaced by `_over_cap`
        self._head_bytes = -1  # bytes of the current head, from its second read on; -1: none
        self._head_began = False  # a head began in the read being parsed
        self._header_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._answered = False

    def connection_made(self, transport: BaseTransport) -> None:
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """uvicorn's, which also counts the bytes of an unfinished head, and stops at once
        (reading nothing more) when a callback answered the request."""
        if self._answered:
            return  # a refused connection's remaining bytes are not parsed
        self._unset_keepalive_if_required()
        self._head_began = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if not self._answered:  # else a callback raised `_Refused`: answered already
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._head_bytes >= 0 and not self._head_began:
            # Only reads after the head's first: a read of pipelined requests never counts a
            # neighbour's bytes, and the head's first read is bounded by the socket's.
            self._head_bytes += len(data)
            if self._head_bytes > _MAX_HEAD_BYTES:
                self._answer(431, "headers_too_large", "request headers too large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = self._header_bytes = 0
        self._head_began = True
        if self._head_timer is None:  # a keep-alive connection's next request
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def on_url(self, url: bytes) -> None:
        super().on_url(url)  # called for each read's part of it, so this sees a long one grow
        if len(self.url) > MAX_URL_BYTES:
            self._refuse(414, "uri_too_long", "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > MAX_HEADER_BYTES:
            self._refuse(431, "headers_too_large", "request headers too large")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._stop_head_timer()
        self._head_bytes = -1
        if self._over_cap():
            self._refuse(503, "over_capacity", "too many connections, retry shortly")
        super().on_headers_complete()

    def _over_cap(self) -> bool:
        cap = self.max_connections
        if cap is None or len(self.connections) <= cap:  # this connection is one of them
            return False
        if self.url.partition(b"?")[0] == _PROBE_PATH:
            return False
        cls = type(self)
        cls._cap_refused += 1
        now = self.loop.time()
        if now - cls._cap_logged_at >= _CAP_LOG_SECONDS:
            logger.warning(
                "%d open connections, MAX_OPEN_CONNECTIONS is %d: refused %d request(s) with "
                "503 (only /healthz is answered until connections close)",
                len(self.connections),
                cap,
                cls._cap_refused,
            )
            cls._cap_logged_at, cls._cap_refused = now, 0
        return True

    def _responding(self) -> bool:
        """A response is under way (the next request's head came early: pipelined)."""
        return self.cycle is not None and not self.cycle.response_complete

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._answered or self.transport.is_closing():
            return
        if self._responding():  # a stream, say: its client is not late, the head waits
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)
            return
        if self._head_bytes < 0:
            self._answered = True  # nothing was sent: no request to answer
            self.transport.close()
            return
        self._answer(408, "request_timeout", "request headers not complete in time")

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse(self, status: int, code: str, detail: str) -> None:
        """Answer from a parser callback, and stop the parser there."""
        self._answer(status, code, detail)
        raise _Refused

    def _answer(self, status: int, code: str, detail: str) -> None:
        """`status` with a JSON body, then close: nothing more is parsed on this connection."""
        self._answered = True
        self._stop_head_timer()
        transport = self.transport
        if self._responding():  # no answer into the middle of another one: just close
            transport.close()
            return
        body = json.dumps({"detail": detail, "code": code}).encode()
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(body),
                b"connection: close\r\n",
                b"retry-after: 1\r\n" if status == 503 else b"",
                b"\r\n",
                body,
            ]
        )
        transport.write(b"".join(content))
        self.logger.debug("%s answered %d (%s)", self.client, status, code)
        if not transport.can_write_eof():
            transport.close()
            return
        # A close with unread bytes in the socket sends a reset, which may destroy the answer
        # in the client's buffers before it read it: end the sending side only, discard what
        # still comes in (`data_received`), and close after a short while.
        transport.write_eof()
        self._head_timer = self.loop.call_later(_LINGER_SECONDS, transport.close)
