"""The hub's direct path to one connection of pricefeed's protocol (app/server/protocol.py):
`SocketFrameWriter`, the `app.frames.FrameWriter` the protocol offers in the ASGI scope, and
`WatchedTransport`, what uvicorn's own writes go through so that the hub stops writing
directly the moment they could come out of order.

Pure asyncio: the connection is seen only through `Connection`, the few attributes of the
protocol these read, and none of uvicorn's or websockets' names.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from app.frames import Transport

HIGH_WATER_BYTES = 64 * 1024  # past this many unsent bytes, the app queues (and conflates) instead


class Writable(Protocol):
    """asyncio.Event's waiting side, or the protocol's lighter `LeanEvent` (app/server/lean.py)."""

    async def wait(self) -> object: ...


class Connection(Protocol):
    """What a `SocketFrameWriter` reads of its connection's protocol."""

    @property
    def raw_transport(self) -> Transport:
        """The connection's own transport, not the watched stand-in."""

    @property
    def close_sent(self) -> bool: ...

    @property
    def disconnected(self) -> bool: ...

    @property
    def writable(self) -> Writable:
        """Set while the transport's buffer is below its low-water mark."""


class SocketFrameWriter:
    """`app.frames.FrameWriter` for one connection of this protocol: writes whole frames, in
    order with everything else it sends.

    The hub may also write to `transport` itself, in a loop over many connections, while
    `on_blocked` is set: the protocol calls it the moment such writes must stop (the transport
    paused writing, or the app is sending its close frame). Anything that closes the transport
    shows in `transport.is_closing()`, which those writers check."""

    __slots__ = ("_protocol", "on_blocked")

    def __init__(self, protocol: Connection) -> None:
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
