"""`FrameWriter`: what the fan-out may do with a WebSocket connection besides ASGI sends.

A server that can write already-encoded frames straight to a connection offers a writer in the
ASGI scope, under `scope["extensions"]["pricefeed.frames"]["writer"]`; pricefeed's own server
protocol (app/server/) does. The hub and the streams see only this protocol type, never the
server's internals: with any other server, or with the stock protocol, there is no writer and
every frame goes out as a plain ASGI send.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

EXTENSION = "pricefeed.frames"
# Offered by pricefeed's protocol on every connection, compressed or not: see
# count_control_frames and park.
CONTROL_EXTENSION = "pricefeed.control"
# Offered by pricefeed's HTTP protocol on every request: see request_transport.
TRANSPORT_EXTENSION = "pricefeed.transport"

Transport = asyncio.Transport


class FrameWriter(Protocol):
    """Writes whole frames to one connection, in order with everything else it sends.

    The hub may also write to `transport` itself, in a loop over many connections, while
    `on_blocked` is set: the server calls it (once, then clears it) the moment such writes
    must stop (the transport paused writing, or a close is under way). Anything that closes
    the transport shows in `transport.is_closing()`, which those writers check."""

    on_blocked: Callable[[], None] | None

    @property
    def transport(self) -> Transport:
        """The connection's own transport."""

    def duplicate_fd(self) -> int | None:
        """A descriptor of its own for the connection's socket, to send() to directly while
        nothing else writes; None when the connection cannot be written that way or holds
        unsent bytes. The caller closes it."""

    def keeping_up(self) -> bool:
        """Open, and its unsent bytes below the high-water mark."""

    async def wait_writable(self) -> None:
        """Until the transport's buffer drained below its low-water mark."""

    def write(self, data: bytes) -> bool:
        """Write regardless of the buffer; False once the connection is closing."""


def frame_writer(scope: Mapping[str, Any]) -> FrameWriter | None:
    """The connection's frame writer, if its server offers one."""
    entry = scope.get("extensions", {}).get(EXTENSION)
    return entry["writer"] if entry else None


def count_control_frames(scope: Mapping[str, Any], allow: Callable[[], bool]) -> bool:
    """Have the server call `allow` for every ping and pong the client sends, before it
    answers: the same budget as the client's messages. `allow` returning False means over the
    rate: the server answers nothing more and closes the connection 1008 by itself (the app
    then receives the disconnect). False when the server offers no such hook (uvicorn's stock
    protocol answers pings itself, uncounted)."""
    entry = scope.get("extensions", {}).get(CONTROL_EXTENSION)
    if entry is None:
        return False
    entry["allow"] = allow
    return True


def park(scope: Mapping[str, Any], resume: Callable[[], Awaitable[None]]) -> bool:
    """Let the app's call return while the connection stays open, when no receive event is
    waiting: the server runs `resume()` as a new task on the next one (a message, or the
    disconnect), which receives it as usual. An idle connection then costs no task. False,
    and the app goes on receiving, when an event is waiting or the server offers no such hook
    (then returning would end the connection)."""
    entry = scope.get("extensions", {}).get(CONTROL_EXTENSION)
    if entry is None or "park" not in entry:
        return False
    parked: bool = entry["park"](resume)
    return parked


def request_transport(scope: Mapping[str, Any]) -> Transport | None:
    """An HTTP request's connection transport, if its server offers it (pricefeed's does): for
    a response that lasts (SSE) to bound its socket's send buffer, and to abort a reader that
    is stuck (a close would wait for it to read what is buffered)."""
    entry = scope.get("extensions", {}).get(TRANSPORT_EXTENSION)
    return entry["transport"] if entry else None
