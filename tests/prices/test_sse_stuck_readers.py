"""SSE readers that connect and never read, against a real server: closed once a send stays
stuck for `WS_SEND_TIMEOUT_SECONDS`, and at their token's expiry even while a send is stuck;
the client sees its connection end (EOF or reset), and the server holds neither a slot nor
the buffers for it.

Only with pricefeed's HTTP protocol (`WS_IMPL=fast`, the `live` default), which offers the
connection's transport to the app: without it the stream still ends but uvicorn's graceful
close waits for the reader (docs/operations.md)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.support import NEEDS_FAST, SEED_SYMBOLS, LiveApp, token

pytestmark = NEEDS_FAST


@contextlib.asynccontextmanager
async def stuck_readers(
    server: LiveApp, count: int, access_token: str
) -> AsyncIterator[list[socket.socket]]:
    """`count` sockets with small receive buffers that ask for every symbol, then read nothing."""
    loop = asyncio.get_running_loop()
    request = (
        f"GET /v1/stream?symbols={','.join(SEED_SYMBOLS)} HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {access_token}\r\nAccept: text/event-stream\r\n\r\n"
    ).encode()
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", server.port))
            await loop.sock_sendall(sock, request)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def server_http_protocols() -> list[Any]:
    from app.server.http_protocol import PricefeedHTTPProtocol  # only where it is admitted

    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, PricefeedHTTPProtocol)]


async def until(predicate: Any, timeout: float) -> float:
    """Seconds until `predicate()` held."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "condition not met in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def connection_ends(sock: socket.socket, within: float) -> None:
    """Read what the kernel holds until EOF or a reset (the server's end is gone), which must
    come `within` seconds: not a response that ended and a keep-alive that lingers."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(within):
        with contextlib.suppress(ConnectionResetError):
            while await loop.sock_recv(sock, 1 << 16):
                pass


async def test_stuck_sse_readers_are_closed_after_the_send_timeout(
    live, caplog: pytest.LogCaptureFixture
) -> None:
    async with live(
        feed_ticks_per_second=400, ws_send_timeout_seconds=1, ws_send_buffer_bytes=8192
    ) as server:
        streams = server.app.state.streams
        async with stuck_readers(server, 5, token("stuck")) as socks:
            await until(lambda: len(streams) == 5, 5)
            # The kernel holds at most WS_SEND_BUFFER_BYTES (Linux doubles what it is given)
            # for each, not the megabytes its autotuning would grow to.
            buffers = [
                p.transport.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
                for p in server_http_protocols()
                if not p.transport.is_closing()
            ]
            assert len(buffers) == 5
            assert max(buffers) <= 2 * 8192
            # Each fills its buffers within a fraction of a second, then its send is stuck
            # for the timeout (1 s): closed well within the token's life (300 s).
            await until(lambda: not len(streams), 8)
            for sock in socks:
                await connection_ends(sock, within=2)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "ended quietly"


async def test_a_stuck_sse_reader_is_closed_at_token_expiry(
    live, caplog: pytest.LogCaptureFixture
) -> None:
    """The send timeout is far away; the token's expiry comes first, while a send is stuck."""
    async with live(
        feed_ticks_per_second=400, ws_send_timeout_seconds=60, ws_send_buffer_bytes=8192
    ) as server:
        streams = server.app.state.streams
        expires_at = time.time() + 3
        async with stuck_readers(server, 2, token("short", ttl=3)) as socks:
            await until(lambda: len(streams) == 2, 3)
            await until(lambda: not len(streams), 8)
            for sock in socks:
                await connection_ends(sock, within=2)
            assert time.time() - expires_at < 2, "closed at expiry, not at the send timeout"
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "ended quietly"
