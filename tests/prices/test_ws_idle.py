"""An idle WebSocket stream holds as little as it can (docs/performance.md, "Idle memory"): on
pricefeed's protocol no task waits for the client's next frame, and the next frame, a close
from either side or the server's shutdown still reach the stream at once."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import time
from pathlib import Path

import orjson

from app.errors import CloseCode
from tests.support import (
    FAST_VARIANTS,
    SERVER_VARIANTS,
    open_stream,
    running,
    serve_in_process,
    server_process,
    signer,
    token,
)


def _connection_tasks() -> list[asyncio.Task[object]]:
    """The server's tasks that run the app for one connection (uvicorn's `run_asgi`, or a
    parked connection's resumed call)."""
    return [
        task
        for task in asyncio.all_tasks()
        if task.get_coro().__qualname__.startswith("PricefeedWebSocketProtocol.")  # type: ignore[union-attr]
    ]


async def _until_no_connection_task(timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while _connection_tasks() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return len(_connection_tasks())


@FAST_VARIANTS
class TestParkedConnections:
    async def test_idle_subscribed_connections_hold_no_task(self, live) -> None:
        async with (
            live(producer="off") as server,
            open_stream(f"{server.ws}/v1/ws?token={token('a')}") as many,
            open_stream(f"{server.ws}/v1/ws/prices/AAPL?token={token('b')}") as one,
        ):
            await many.send({"op": "subscribe", "symbols": ["AAPL", "MSFT"]})
            await many.recv_type("subscribed")
            assert await _until_no_connection_task() == 0
            # Woken by their next frame, then idle again.
            await many.send({"op": "ping"})
            assert (await many.recv_type("pong"))["type"] == "pong"
            for _ in range(60):  # past WS_MAX_MESSAGES_PER_SECOND's burst
                await one.send("{}")
            code, _ = await one.closed_with()
            assert code == CloseCode.POLICY
            assert await _until_no_connection_task() == 0
            await many.send({"op": "unsubscribe", "symbols": ["MSFT"]})
            assert (await many.recv_type("unsubscribed"))["symbols"] == ["MSFT"]

    async def test_a_parked_connection_is_closed_1001_on_shutdown(self, live) -> None:
        async with contextlib.AsyncExitStack() as client:
            async with live(producer="off") as server:
                stream = await client.enter_async_context(
                    open_stream(f"{server.ws}/v1/ws?token={token()}")
                )
                await stream.send({"op": "subscribe", "symbols": ["AAPL"]})
                await stream.recv_type("subscribed")
                assert await _until_no_connection_task() == 0
            # the server has shut down, with the client still connected
            code, _ = await stream.closed_with()
        assert code == CloseCode.GOING_AWAY


@SERVER_VARIANTS
async def test_a_stream_that_ends_while_idle_gives_its_slot_back(live) -> None:
    """WS_MAX_CONNECTIONS_PER_SUBJECT: a stream that ended while it waited for the client
    (parked on pricefeed's protocol) no longer counts."""
    url = "/v1/ws?token=" + token("carol")
    async with live(producer="off", ws_max_connections_per_subject=2) as server:
        async with open_stream(server.ws + url) as first, open_stream(server.ws + url) as second:
            for stream in (first, second):
                await stream.send({"op": "subscribe", "symbols": ["AAPL"]})
                await stream.recv_type("subscribed")
            async with open_stream(server.ws + url) as third:
                code, _ = await third.closed_with()
                assert code == CloseCode.POLICY  # the subject's two slots are taken
        # Both went away while idle: their slots come back.
        deadline = time.monotonic() + 5
        while True:
            async with open_stream(server.ws + url) as again:
                await again.send({"op": "ping"})
                try:
                    frame = await again.recv_type("pong", timeout=1)
                except Exception:  # noqa: BLE001 - refused: not counted out yet
                    assert time.monotonic() < deadline, "the ended streams still count"
                    await asyncio.sleep(0.05)
                    continue
            assert frame == {"type": "pong"}
            break


# -- the timers on the shared wheel (app/timers.py): keepalive pings, heartbeats, deadlines


async def _open_raw(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket client that does nothing by itself: no pong unless the test sends one."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    writer.write(request.encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The next frame the server sends (unmasked, unfragmented): opcode, payload."""
    first, second = await reader.readexactly(2)
    length = second & 0x7F
    if length == 126:
        length = int.from_bytes(await reader.readexactly(2), "big")
    elif length == 127:
        length = int.from_bytes(await reader.readexactly(8), "big")
    return first & 0x0F, await reader.readexactly(length)


def _client_frame(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    assert len(payload) < 126
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


PING, PONG, CLOSE, TEXT = 0x9, 0xA, 0x8, 0x1


@FAST_VARIANTS
class TestKeepalive:
    async def test_a_peer_that_answers_keepalive_pings_stays(
        self, build_app, fanout_direct_writes: bool
    ) -> None:
        app = build_app(producer="off", fanout_direct_writes=fanout_direct_writes)
        keepalive = {"ws_ping_interval": 0.2, "ws_ping_timeout": 0.5}
        async with serve_in_process(app, **keepalive) as server:
            reader, writer = await _open_raw(server.port, f"/v1/ws?token={token()}")
            subscribe = orjson.dumps({"op": "subscribe", "symbols": ["AAPL"]})
            writer.write(_client_frame(TEXT, subscribe))
            pings = 0
            while pings < 5:  # one after another, each answered: ~1 s
                opcode, payload = await asyncio.wait_for(_read_frame(reader), 5)
                assert opcode != CLOSE, payload
                if opcode == PING:
                    pings += 1
                    writer.write(_client_frame(PONG, payload))
            writer.close()

    async def test_a_dead_peer_is_closed_1011(self, build_app, fanout_direct_writes: bool) -> None:
        app = build_app(producer="off", fanout_direct_writes=fanout_direct_writes)
        keepalive = {"ws_ping_interval": 0.2, "ws_ping_timeout": 0.3}
        async with serve_in_process(app, **keepalive) as server:
            reader, writer = await _open_raw(server.port, f"/v1/ws?token={token()}")
            subscribe = orjson.dumps({"op": "subscribe", "symbols": ["AAPL"]})
            writer.write(_client_frame(TEXT, subscribe))
            seen: list[int] = []
            while not seen or seen[-1] != CLOSE:  # never a pong
                opcode, payload = await asyncio.wait_for(_read_frame(reader), 5)
                seen.append(opcode)
            writer.close()
        assert PING in seen
        assert int.from_bytes(payload[:2], "big") == 1011  # keepalive ping timeout


async def test_heartbeats_and_deadlines_fire_on_a_server_process(
    tmp_path: Path, database_url: str
) -> None:
    """`python -m app`: an idle subscribed stream gets a heartbeat every period, one that
    subscribes to nothing is closed 1008 at its deadline, and one whose token expires 4408."""
    server = server_process(
        tmp_path,
        "timers",
        database_url,
        PRODUCER="off",
        WS_HEARTBEAT_SECONDS="0.3",
        WS_SUBSCRIBE_TIMEOUT_SECONDS="1",
        JWT_LEEWAY_SECONDS="0",
    )
    with running(server, sig=int(signal.SIGTERM)):
        await server.wait_ready()
        short = signer().issue(subject="brief", symbols=["*"], ttl_seconds=2)
        async with (
            open_stream(f"{server.ws}/v1/ws?token={token('steady')}") as steady,
            open_stream(f"{server.ws}/v1/ws?token={token('silent')}") as silent,
            open_stream(f"{server.ws}/v1/ws?token={short}") as expiring,
        ):
            for stream in (steady, expiring):
                await stream.send({"op": "subscribe", "symbols": ["AAPL"]})
                await stream.recv_type("subscribed")
            beats = [await steady.recv_type("heartbeat", timeout=3) for _ in range(4)]
            assert all(b["ts"] > 0 for b in beats)
            code, _ = await silent.closed_with(5)
            assert code == CloseCode.POLICY
            code, _ = await expiring.closed_with(5)
            assert code == CloseCode.TOKEN_EXPIRED
            assert (await steady.recv_type("heartbeat", timeout=3))["type"] == "heartbeat"
