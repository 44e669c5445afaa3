"""The WebSocket protocol pricefeed runs under uvicorn (app/server/protocol.py): against a real
server, what it changes must not change what a client sees; in process, its hooks take a
connection off the hub's direct sends before uvicorn acts on its end.

Only `WS_IMPL=fast` runs this protocol (the `live` default): these tests run on it alone, with
the hub's direct writes on and off where a live server is involved."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from app.errors import CloseCode
from app.frames import EXTENSION
from tests.support import FAST_UNAVAILABLE, FAST_VARIANTS, NEEDS_FAST, Stream, open_stream, token

if FAST_UNAVAILABLE:
    pytest.skip(NEEDS_FAST.kwargs["reason"], allow_module_level=True)
from app.server.direct_writes import WatchedTransport  # only once admitted
from app.server.protocol import PricefeedWebSocketProtocol


def server_protocols() -> list[PricefeedWebSocketProtocol]:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, PricefeedWebSocketProtocol)]


@contextlib.asynccontextmanager
async def subscribed(
    live: Any, subject: str
) -> AsyncIterator[tuple[Any, Stream, list[PricefeedWebSocketProtocol]]]:
    """A real server, a client subscribed to AAPL, and the server's open protocols."""
    async with (
        live() as server,
        open_stream(f"{server.ws}/v1/ws?token={token(subject)}") as stream,
    ):
        await stream.send({"op": "subscribe", "symbols": ["AAPL"]})
        await stream.recv_type("subscribed")
        protocols = [p for p in server_protocols() if not p.disconnected]
        assert protocols, "the connection is served by pricefeed's protocol"
        yield server, stream, protocols


@FAST_VARIANTS
async def test_the_handshake_request_is_not_kept_for_the_life_of_the_connection(live) -> None:
    """The request (headers, and the path with `?token=`) is dropped once the handshake is
    done, and frames from the client still parse: subscribe, ping, unsubscribe."""
    async with subscribed(live, "keeper") as (_, stream, protocols):
        for protocol in protocols:
            assert protocol.request is None
            frame = protocol.conn.parser.gi_frame
            assert frame is None or "request" not in frame.f_locals, "request still held"
        await stream.send({"op": "ping"})
        assert (await stream.recv_type("pong"))["type"] == "pong"
        await stream.send({"op": "unsubscribe", "symbols": ["AAPL"]})
        assert (await stream.recv_type("unsubscribed"))["symbols"] == ["AAPL"]


@FAST_VARIANTS
async def test_a_connection_keeps_its_attributes_compact(live) -> None:
    """Past 29 attributes CPython gives an instance a dict of its own (~1.6 KB instead of
    ~0.3 KB): what every connection of a server shares is held once, and a value that one
    connection changes stays its own."""
    async with subscribed(live, "compact") as (server, _, protocols):
        assert all(len(vars(protocol)) <= 29 for protocol in protocols)
        (mine,) = protocols
        mine.close_timeout = 0.25
        async with open_stream(f"{server.ws}/v1/ws?token={token('other')}") as other:
            await other.send({"op": "ping"})
            await other.recv_type("pong")
            (theirs,) = [p for p in server_protocols() if p is not mine and not p.disconnected]
            assert len(vars(theirs)) <= 29
            assert (mine.close_timeout, theirs.close_timeout) == (0.25, 10.0)
            assert theirs.connections is mine.connections  # the server's own set
            # the server's current Date and Server headers, as uvicorn sends them
            assert "date" in other.conn.response.headers
            assert other.conn.response.headers["server"] == "uvicorn"


@pytest.mark.both_loops
class TestLeavingTheFastPath:
    """The protocol takes a connection off the hub's direct sends as soon as the connection
    starts to end or to back up, before uvicorn or the app acts on it (in process, over a
    real socket pair; the app is never called)."""

    class Writer:
        def __init__(self, protocol: PricefeedWebSocketProtocol) -> None:
            self.protocol = protocol
            self.blocked_calls = 0
            self.first_while_connected: bool | None = None  # uvicorn not yet told of the end
            self.first_while_open: bool | None = None  # the socket not yet closing

        def blocked(self) -> None:
            if self.first_while_connected is None:
                self.first_while_connected = not self.protocol.disconnected
                self.first_while_open = not self.protocol.raw_transport.is_closing()
            self.blocked_calls += 1

    @contextlib.asynccontextmanager
    async def served(self) -> AsyncIterator[tuple[PricefeedWebSocketProtocol, socket.socket]]:
        config = Config(app=self.never_called, ws="websockets-sansio", lifespan="off")
        config.load()
        protocol = PricefeedWebSocketProtocol(
            config=config, server_state=ServerState(), app_state={}
        )
        ours, peer = socket.socketpair()
        peer.setblocking(False)
        await asyncio.get_running_loop().connect_accepted_socket(lambda: protocol, ours)
        writer = self.Writer(protocol)
        protocol.scope = {"extensions": {EXTENSION: {"writer": writer}}}  # type: ignore[typeddict-item]
        protocol.test_writer = writer  # type: ignore[attr-defined]
        try:
            yield protocol, peer
        finally:
            peer.close()
            protocol.transport.close()
            await asyncio.sleep(0)

    @staticmethod
    async def never_called(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the app is not part of this test")

    @staticmethod
    async def until(predicate: Any) -> None:
        for _ in range(100):
            if predicate():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("condition not met")

    async def test_a_half_close_from_the_peer(self) -> None:
        async with self.served() as (protocol, peer):
            peer.shutdown(socket.SHUT_WR)  # EOF: the transport closes once the protocol hears it
            await self.until(lambda: protocol.disconnected)
            # at EOF, not when the transport closes for it (the hub could send in between)
            assert protocol.test_writer.first_while_open  # type: ignore[attr-defined]

    async def test_a_connection_lost(self) -> None:
        async with self.served() as (protocol, peer):
            protocol.raw_transport.abort()  # underneath uvicorn's watched transport
            await self.until(lambda: protocol.disconnected)
            assert protocol.test_writer.first_while_connected  # type: ignore[attr-defined]

    async def test_a_transport_that_pauses_writing(self) -> None:
        async with self.served() as (protocol, peer):
            calls = protocol.test_writer.blocked_calls  # type: ignore[attr-defined]
            protocol.raw_transport.write(b"x" * (4 << 20))  # unwatched; the peer reads nothing
            await self.until(lambda: protocol.test_writer.blocked_calls > calls)  # type: ignore[attr-defined]
            assert not protocol.writable.is_set()  # uvicorn's own handling still ran


@FAST_VARIANTS
async def test_uvicorns_shutdown_closes_streams_with_1001(live) -> None:
    """uvicorn closes every connection when it stops serving; without a signal the app's own
    hook never runs, and uvicorn's protocol would say 1012. Clients must see 1001."""
    async with subscribed(live, "leaver") as (server, stream, protocols):
        for protocol in protocols:
            protocol.shutdown()
        code, _ = await stream.closed_with(5)
        assert code == CloseCode.GOING_AWAY
        assert stream.conn.close_reason == "server going away"
        await TestLeavingTheFastPath.until(lambda: not len(server.app.state.streams))


class TestWatchedTransport:
    """What uvicorn writes must take a connection off the hub's direct sends first when it
    could be overtaken (bytes left buffered) or followed (a close)."""

    class Inner:
        def __init__(self, buffered: int = 0) -> None:
            self.buffered = buffered
            self.calls: list[str] = []

        def write(self, data: bytes) -> None:
            self.calls.append("write")

        def get_write_buffer_size(self) -> int:
            return self.buffered

        def close(self) -> None:
            self.calls.append("close")

        def abort(self) -> None:
            self.calls.append("abort")

        def write_eof(self) -> None:
            self.calls.append("write_eof")

    def watched(self, inner: Inner, log: list[str]) -> WatchedTransport:
        return WatchedTransport(inner, lambda: log.append("left"))  # type: ignore[arg-type]

    def test_a_write_that_went_out_whole_keeps_the_fast_path(self) -> None:
        log: list[str] = []
        self.watched(self.Inner(buffered=0), log).write(b"ping")
        assert log == []

    def test_a_write_that_left_bytes_buffered_leaves_it(self) -> None:
        log: list[str] = []
        self.watched(self.Inner(buffered=10), log).write(b"pong")
        assert log == ["left"]

    @pytest.mark.parametrize("method", ["close", "abort", "write_eof"])
    def test_a_close_leaves_it_before_the_transport_closes(self, method: str) -> None:
        log: list[str] = []
        inner = self.Inner()
        transport = self.watched(inner, log)
        inner.calls = log  # one log: the order of the two
        getattr(transport, method)()
        assert log == ["left", method]
