"""uvicorn's websockets-sansio protocol, plus two ASGI extensions: `pricefeed.frames`, a way to
write already-encoded WebSocket frames straight to the connection's transport (the app sees it
only as `app.frames.FrameWriter`); and `pricefeed.control`, through which the app's message
budget counts the client's pings and pongs (`app.frames.count_control_frames`), which
websockets answers by itself (past the budget, or with its pongs piling up unread, the client
is closed here), and through which an idle stream parks its connection (`app.frames.park`).

The hub encodes each tick's frame once and writes those same bytes to every subscriber: no
per-connection encoding, no task switch, no ASGI message per tick. The extension is offered
only when the connection negotiated no extension (a compressed connection needs its frames
compressed per connection); without it the app falls back to plain ASGI sends, so the app
still runs under any ASGI server.

Select it with `WS_IMPL=fast` (the default). This module reaches into uvicorn's and websockets'
internals (private attributes of `WebSocketsSansIOProtocol`, `Protocol.parse`): only
app/server/guard.py imports it, and only for the versions it was tested with; otherwise the
service runs uvicorn's stock protocol.

Top to bottom: the connection's life and where it leaves the hub's direct path (the writer and
the watched transport are app/server/direct_writes.py), the park hook, keepalive pings on the
timer wheel, the client's pings and pongs. What every connection of a server shares is held
once per server (app/server/shared.py).
"""

from __future__ import annotations

import asyncio
import socket
from asyncio import BaseTransport
from collections.abc import Awaitable, Callable
from typing import Any, cast

from uvicorn._types import ASGISendEvent
from uvicorn.config import Config
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import Protocol, State

from app.errors import CloseCode
from app.frames import CONTROL_EXTENSION, EXTENSION, Transport, frame_writer
from app.server.direct_writes import HIGH_WATER_BYTES, SocketFrameWriter, WatchedTransport
from app.server.lean import LeanEvent, LeanQueue
from app.server.shared import share_per_server, shared_by
from app.timers import coarse_timers

# Past this many unsent bytes after answering a ping, the client is closed 1013 (it does not read
# what it asked for). The app never gets there: it stops writing at HIGH_WATER_BYTES and adds at
# most one bounded outbox drain; only pongs, which websockets answers by itself, could.
MAX_UNSENT_BYTES = 4 * HIGH_WATER_BYTES
_CONTROL_OPCODES = (Opcode.PING, Opcode.PONG)


class PricefeedWebSocketProtocol(WebSocketsSansIOProtocol):
    # WS_SEND_BUFFER_BYTES (0: the kernel's autotuning); uvicorn instantiates the class.
    send_buffer_bytes = 0

    @classmethod
    def configure(cls, *, send_buffer_bytes: int) -> None:
        cls.send_buffer_bytes = send_buffer_bytes

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        # Before uvicorn sets the attributes it holds (app/server/shared.py).
        self.server_shared = shared_by(server_state)
        super().__init__(config, server_state, app_state, _loop)
        # Thousands of these live for hours: lighter stand-ins for two asyncio primitives.
        self.queue = LeanQueue()  # type: ignore[assignment]
        self.writable = LeanEvent()  # type: ignore[assignment]
        self.writable.set()
        # The app's budget for the client's pings and pongs (app.frames.count_control_frames).
        self.control: dict[str, Any] | None = None
        # What the app left to run on the next receive event (app.frames.park), None otherwise.
        self.parked: Callable[[], Awaitable[None]] | None = None

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
            self.control = scope["extensions"][CONTROL_EXTENSION] = {
                "allow": None,
                "park": self._park,
            }
            if not self.conn.extensions:
                scope["extensions"][EXTENSION] = {"writer": SocketFrameWriter(self)}
        self._forget_handshake_request()

    # -- no task while idle: the app's call may return with the connection open (app.frames.park)

    def _park(self, resume: Callable[[], Awaitable[None]]) -> bool:
        """Let the app's current call end without ending the connection: the next receive
        event (a message, the disconnect) runs `resume()` as a task of its own. An idle
        connection then holds no task and no chain of coroutines waiting in `receive`
        (~4 KB). False, and nothing changes, while an event is already waiting."""
        if not self.handshake_complete or not self.queue.empty():
            return False
        self.parked = resume
        cast(LeanQueue, self.queue).on_put = self._resume
        return True

    def _resume(self) -> None:
        resume, self.parked = self.parked, None
        if resume is None:
            return
        task = self.loop.create_task(self._run_app(resume()))
        task.add_done_callback(self.on_task_complete)
        self.tasks.add(task)  # uvicorn's shutdown waits for it, as for `run_asgi`

    def _unpark(self) -> None:
        self.parked = None
        cast(LeanQueue, self.queue).on_put = None

    async def run_asgi(self) -> None:
        """uvicorn's, except that an app that parked its connection has not ended it."""
        try:
            result = await self.app(self.scope, self.receive, self.send)
        except ClientDisconnected:
            self._unpark()
        except BaseException:
            self._unpark()
            self.logger.exception("Exception in ASGI application\n")
            self.send_500_response()
        else:
            if not self.handshake_complete:
                self.logger.error("ASGI callable returned without completing handshake.")
                self.send_500_response()
            elif result is not None:
                self.logger.error("ASGI callable should return None, but returned '%s'.", result)
        self._app_returned()

    async def _run_app(self, call: Awaitable[None]) -> None:
        """A parked app's resumed call: its errors handled as `run_asgi` handles the first's."""
        try:
            await call
        except ClientDisconnected:
            self._unpark()
        except BaseException:
            self._unpark()
            self.logger.exception("Exception in ASGI application\n")
        self._app_returned()

    def _app_returned(self) -> None:
        """The app is done with the connection unless it parked it."""
        if self.parked is None and self.close_timer is None:
            self.transport.close()

    # -- keepalive pings, and their pong deadlines, on the shared timer wheel (app/timers.py)

    def schedule_ping(self) -> None:
        assert self.ping_interval is not None
        delay = max(0.0, self.ping_interval - self.last_ping_rtt)
        self.ping_timer = coarse_timers().call_later(delay, self.send_keepalive_ping)  # type: ignore[assignment]

    def send_keepalive_ping(self) -> None:
        super().send_keepalive_ping()
        pong_timer = self.pong_timer
        if isinstance(pong_timer, asyncio.TimerHandle):  # uvicorn's, on the loop
            pong_timer.cancel()
            assert self.ping_timeout is not None
            self.pong_timer = coarse_timers().call_later(self.ping_timeout, self.keepalive_timeout)  # type: ignore[assignment]

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


share_per_server(PricefeedWebSocketProtocol)
