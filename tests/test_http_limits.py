"""`PricefeedHTTPProtocol` (app/server/http_protocol.py): what a client can hold before its
request reaches the app. Request heads are bounded (414, 431) and timed (408), idle sockets are
closed, and past MAX_OPEN_CONNECTIONS requests get 503 while /healthz still answers. Raw
sockets against a real uvicorn server: the attack is on the wire."""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import httpx
import pytest

from app.server.http_protocol import MAX_HEADER_BYTES, MAX_URL_BYTES
from app.server.run import check_connection_cap
from tests.support import LiveApp, make_settings, token

Live = Callable[..., AbstractAsyncContextManager[LiveApp]]


@asynccontextmanager
async def raw(server: LiveApp) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


async def answer(
    reader: asyncio.StreamReader, timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    """The server's whole answer, up to its close: status, headers, body."""
    data = await asyncio.wait_for(reader.read(), timeout)  # until EOF: the server closed
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def refused_with(reply: tuple[int, dict[str, str], bytes], status: int, code: str) -> None:
    got, headers, body = reply
    assert got == status
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["code"] == code


async def test_a_long_request_line_is_414(live: Live) -> None:
    async with live() as server, raw(server) as (reader, writer):
        writer.write(b"GET /healthz?pad=" + b"a" * (9 * 1024) + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        refused_with(await answer(reader), 414, "uri_too_long")


async def test_too_many_header_bytes_is_431(live: Live) -> None:
    headers = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"v" * 1024) for i in range(17))
    async with live() as server, raw(server) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        refused_with(await answer(reader), 431, "headers_too_large")


async def test_a_never_ending_header_is_cut_off_at_its_limit(live: Live) -> None:
    """The server stops reading (431, close) after about the limit, however much follows: it
    does not gather the header first (once, one of 512 MB grew the process to ~1 GB)."""
    chunk = b"v" * 4096
    sent = 0
    async with live() as server, raw(server) as (reader, writer):
        reply = asyncio.create_task(answer(reader))
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        try:
            while not reply.done() and sent < 50 * 1024 * 1024:
                writer.write(chunk)
                sent += len(chunk)
                await writer.drain()
                await asyncio.sleep(0)  # the server runs in this loop: let it read
        except ConnectionError:
            pass  # it closed while we were sending
        refused_with(await reply, 431, "headers_too_large")
    # What was sent before the answer: the limit, plus what the socket's buffers took in.
    assert sent < 1024 * 1024, sent


async def test_large_but_legal_heads_are_served(live: Live) -> None:
    token = "t" * 4096
    query = "pad=" + "q" * (MAX_URL_BYTES - 200)
    extra = {f"x-pad-{i}": "v" * 1000 for i in range((MAX_HEADER_BYTES - 6000) // 1000)}
    async with live() as server, httpx.AsyncClient(base_url=server.http) as client:
        for _ in range(3):  # on one keep-alive connection
            response = await client.get(
                f"/healthz?{query}", headers={"Authorization": f"Bearer {token}", **extra}
            )
            assert response.status_code == 200


async def test_a_half_sent_request_line_is_408_after_the_timeout(live: Live) -> None:
    async with live(ws_handshake_timeout_seconds=1.0) as server, raw(server) as (reader, writer):
        started = time.monotonic()
        writer.write(b"GET /heal")
        refused_with(await answer(reader), 408, "request_timeout")
        assert 0.9 < time.monotonic() - started < 4


async def test_a_keep_alive_request_that_never_ends_is_408(live: Live) -> None:
    """The timer starts again for a connection's next request (slowloris on keep-alive)."""
    async with live(ws_handshake_timeout_seconds=1.0) as server, raw(server) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert first.startswith(b"HTTP/1.1 200")
        await asyncio.wait_for(reader.readuntil(b"}"), 5)  # its small JSON body
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        refused_with(await answer(reader), 408, "request_timeout")


async def test_a_head_pipelined_behind_a_stream_is_not_answered_into_it(live: Live) -> None:
    """The next request's head may wait while a response is under way (an SSE stream, here):
    no 408 is written into the middle of the stream."""
    async with live(ws_handshake_timeout_seconds=0.5) as server, raw(server) as (reader, writer):
        writer.write(
            b"GET /v1/stream?symbols=AAPL HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + token().encode() + b"\r\n\r\nGET /hea"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        received = b""
        deadline = time.monotonic() + 1.5  # three timeouts
        while time.monotonic() < deadline:
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            assert chunk, "the stream was closed"
            received += chunk
        assert b"HTTP/1.1 408" not in received
        assert b"event: snapshot" in received


async def test_idle_sockets_are_closed_while_requests_are_served(live: Live) -> None:
    async with live(ws_handshake_timeout_seconds=1.0) as server:
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(100)]
        try:
            async with httpx.AsyncClient(base_url=server.http) as client:
                assert (await client.get("/healthz")).status_code == 200
                # Closed without an answer: they never asked anything.
                closed = await asyncio.wait_for(
                    asyncio.gather(*(reader.read() for reader, _ in idle)), 5
                )
                assert closed == [b""] * 100
                assert (await client.get("/v1/symbols")).status_code in (200, 401)
        finally:
            for _, writer in idle:
                writer.close()


async def test_past_the_connection_cap_requests_are_503_but_healthz_answers(
    live: Live, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with live(max_open_connections=5) as server:
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(5)]
        try:
            async with raw(server) as (reader, writer):
                writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
                reply = await answer(reader)
            refused_with(reply, 503, "over_capacity")
            assert reply[1]["retry-after"] == "1"
            async with raw(server) as (reader, writer):  # a WebSocket handshake, the same
                writer.write(
                    b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                )
                refused_with(await answer(reader), 503, "over_capacity")
            async with raw(server) as (reader, writer):
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                status, _, _ = await answer(reader)
            assert status == 200
            assert any("MAX_OPEN_CONNECTIONS is 5" in r.getMessage() for r in caplog.records)
        finally:
            for _, writer in idle:
                writer.close()
        # Once they are gone, requests are served again.
        await wait_for_status(server, "/readyz", (200, 503), refused=False)


async def wait_for_status(
    server: LiveApp, path: str, statuses: tuple[int, ...], *, refused: bool, timeout: float = 5
) -> Any:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=server.http) as client:
        while True:
            response = await client.get(path, headers={"Connection": "close"})
            over = response.headers.get("content-type") == "application/json" and (
                response.json().get("code") == "over_capacity"
            )
            if response.status_code in statuses and over == refused:
                return response
            assert time.monotonic() < deadline, response.text
            await asyncio.sleep(0.05)


def test_a_cap_above_the_open_file_limit_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Past the open-file limit connections wait unaccepted, probes too, and nothing is logged
    then: so startup says it, once."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    caplog.set_level(logging.WARNING, logger="app.server")
    check_connection_cap(make_settings("sqlite+aiosqlite://", max_open_connections=soft // 2))
    assert not caplog.records
    check_connection_cap(make_settings("sqlite+aiosqlite://", max_open_connections=soft))
    assert "exceeds the open-file limit" in caplog.records[0].getMessage()
