"""`WS_SUBSCRIBE_TIMEOUT_SECONDS`: a multiplexed connection (`/v1/ws`) that has subscribed to
nothing by then is closed 1008; one that subscribed in time stays, on every server variant."""

from __future__ import annotations

import time

from app.errors import CloseCode
from tests.support import SERVER_VARIANTS, open_stream, token


@SERVER_VARIANTS
async def test_a_connection_that_never_subscribes_is_closed_1008(live) -> None:
    async with (
        live(ws_subscribe_timeout_seconds=1) as server,
        open_stream(f"{server.ws}/v1/ws?token={token('idle')}") as idle,
    ):
        started = time.monotonic()
        await idle.send({"op": "ping"})  # requests other than subscribe do not count
        assert (await idle.recv_type("pong"))["type"] == "pong"
        code, _ = await idle.closed_with(5)
        assert code == CloseCode.POLICY
        assert 0.9 < time.monotonic() - started < 4
        assert idle.conn.close_reason == "no subscription; subscribe after connecting"


@SERVER_VARIANTS
async def test_a_connection_that_subscribed_in_time_stays(live) -> None:
    async with (
        live(ws_subscribe_timeout_seconds=1) as server,
        open_stream(f"{server.ws}/v1/ws?token={token('busy')}") as busy,
    ):
        await busy.send({"op": "subscribe", "symbols": ["AAPL"]})
        await busy.recv_type("snapshot")
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:  # past the timeout, ticks keep coming
            assert (await busy.recv_type("tick"))["symbol"] == "AAPL"
