"""A client's pings and pongs against a real server: they spend from the same budget as its
messages (`WS_MAX_MESSAGES_PER_SECOND`, past it 1008), and a client that sends pings but never
reads their pongs is closed 1013 once its unsent bytes pass a bound.

websockets answers pings inside the protocol, so only pricefeed's protocol (app/server/
protocol.py) can count them: on uvicorn's stock protocol neither holds (docs/operations.md)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import time
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from app.errors import CloseCode
from tests.support import FAST_UNAVAILABLE, FAST_VARIANTS, NEEDS_FAST, open_stream, token

if FAST_UNAVAILABLE:
    pytest.skip(NEEDS_FAST.kwargs["reason"], allow_module_level=True)
from app.server.protocol import MAX_UNSENT_BYTES, PricefeedWebSocketProtocol  # once admitted

# A masked client ping with a 125-byte payload (mask key 0: the payload goes as is).
PING = b"\x89" + bytes([0x80 | 125]) + b"\0\0\0\0" + b"p" * 125


async def until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@FAST_VARIANTS
async def test_a_ping_flooder_is_closed_1008_while_a_subscriber_keeps_its_ticks(
    live, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        live(feed_ticks_per_second=50) as server,
        open_stream(f"{server.ws}/v1/ws?token={token('calm')}") as calm,
        open_stream(f"{server.ws}/v1/ws?token={token('flooder')}") as flooder,
    ):
        await calm.send({"op": "subscribe", "symbols": ["AAPL"]})
        await calm.recv_type("snapshot")

        pongs: list[asyncio.Future[float]] = []

        async def flood() -> int:
            sent = 0
            with contextlib.suppress(ConnectionClosed):
                while sent < 100_000:
                    pongs.append(await flooder.conn.ping())
                    sent += 1
                    if sent % 20 == 0:
                        await asyncio.sleep(0)  # let the server (same loop) read them
            return sent

        started = time.monotonic()
        flooding = asyncio.create_task(flood())
        ticks = []
        while not flooding.done():
            assert time.monotonic() - started < 3, "the flooder was not closed in time"
            ticks.append(await calm.recv_type("tick"))
        sent = flooding.result()
        await asyncio.wait_for(flooder.conn.wait_closed(), 5)
        assert flooder.conn.close_code == CloseCode.POLICY
        assert flooder.conn.close_reason == "too many messages per second"
        assert sent < 5000, "the flooder was stopped, not answered"
        answered = sum(1 for p in pongs if p.done() and not p.cancelled() and not p.exception())
        # The budget: a burst of 40 (twice WS_MAX_MESSAGES_PER_SECOND), refilled at 20 a second.
        assert answered <= 40 + 20 * (time.monotonic() - started)
        # The subscriber kept its ticks, in order, and still does.
        ticks.append(await calm.recv_type("tick"))
        seqs = [t["seq"] for t in ticks]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        await until(lambda: len(server.app.state.streams) == 1)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "closed quietly"


@FAST_VARIANTS
async def test_pings_spend_from_the_message_budget(live) -> None:
    """A client within the rate for messages alone is over it with its pings counted."""
    async with (
        live(ws_max_messages_per_second=5) as server,
        open_stream(f"{server.ws}/v1/ws?token={token('mixed')}") as client,
    ):
        for _ in range(8):  # the burst is 10 frames: 8 pings...
            await client.conn.ping()
        for _ in range(4):  # ...and 4 requests
            with contextlib.suppress(ConnectionClosed):
                await client.send({"op": "ping"})
        code, _ = await client.closed_with(5)
        assert code == CloseCode.POLICY


def server_protocols() -> list[PricefeedWebSocketProtocol]:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, PricefeedWebSocketProtocol)]


def read_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each whole server frame (unmasked) in `data`."""
    frames = []
    at = 0
    while at + 2 <= len(data):
        opcode, length = data[at] & 0x0F, data[at + 1] & 0x7F
        at += 2
        if length == 126:
            length, at = int.from_bytes(data[at : at + 2], "big"), at + 2
        elif length == 127:
            length, at = int.from_bytes(data[at : at + 8], "big"), at + 8
        if at + length > len(data):
            break
        frames.append((opcode, data[at : at + length]))
        at += length
    return frames


@pytest.mark.both_loops
@FAST_VARIANTS
async def test_a_client_that_pings_but_never_reads_is_closed_1013(live) -> None:
    """With the rate out of the way, a client that never reads its pongs: the server's unsent
    bytes stop at the bound, it closes the connection 1013 and stops reading, and aborts it
    when the close frame is not taken either (`close_timeout`, shortened here)."""
    loop = asyncio.get_running_loop()
    async with live(ws_max_messages_per_second=1e9, ws_send_buffer_bytes=8192) as server:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", server.port))
            await loop.sock_sendall(
                sock,
                (
                    f"GET /v1/ws?token={token('deaf')} HTTP/1.1\r\nHost: x\r\n"
                    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    "Sec-WebSocket-Version: 13\r\n\r\n"
                ).encode(),
            )
            response = b""
            while b"\r\n\r\n" not in response:
                response += await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)
            assert response.startswith(b"HTTP/1.1 101")
            await until(lambda: len(server.app.state.streams) == 1)
            (protocol,) = [p for p in server_protocols() if not p.disconnected]
            protocol.close_timeout = 0.5

            # Up to 4 MB of pings, never reading; once the server stops reading, the rest
            # stays unsent on this side.
            sending = asyncio.create_task(loop.sock_sendall(sock, PING * 30_000))
            try:
                await until(lambda: protocol.close_sent, timeout=10)
            finally:
                sending.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sending
            unsent = protocol.raw_transport.get_write_buffer_size()
            assert unsent <= 2 * MAX_UNSENT_BYTES, f"{unsent} unsent bytes held for the client"
            assert protocol.conn.close_sent is not None
            assert protocol.conn.close_sent.code == CloseCode.TRY_LATER
            await until(lambda: not len(server.app.state.streams))  # the app saw it end
            await until(lambda: protocol.disconnected)  # aborted: nothing held any more

            # Reading at last: the pongs the kernel held, then the end of the connection.
            received = bytearray(response.split(b"\r\n\r\n", 1)[1])
            with contextlib.suppress(ConnectionResetError):
                while chunk := await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), 5):
                    received += chunk
        finally:
            sock.close()
        frames = read_frames(bytes(received))
        assert frames
        assert {opcode for opcode, _ in frames} <= {0xA, 0x8}  # pongs, maybe the close
