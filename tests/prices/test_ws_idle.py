"""An idle WebSocket stream holds as little as it can (docs/performance.md, "Idle memory"): on
pricefeed's protocol no task waits for the client's next frame, and the next frame, a close
from either side or the server's shutdown still reach the stream at once."""

from __future__ import annotations

import asyncio
import contextlib
import time

from app.errors import CloseCode
from tests.support import FAST_VARIANTS, SERVER_VARIANTS, open_stream, token


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
