"""app/client.py against a real uvicorn: `watch` reconnects with a backoff that starts over
once a connection delivered ticks, resumes without a gap, and raises StreamRefused carrying a
CloseCode for what reconnecting cannot fix."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import httpx
import pytest

from app import client as client_module
from app.client import PricefeedClient, StreamRefused
from app.errors import CloseCode
from tests.instruments.admin_support import add_instrument, disable_instrument
from tests.support import LiveApp, token

LiveFactory = Callable[..., AbstractAsyncContextManager[LiveApp]]


def reconnect_delays(caplog: pytest.LogCaptureFixture) -> list[float]:
    return [
        float(record.args[0])  # type: ignore[index,arg-type]
        for record in caplog.records
        if record.name == "app.client" and record.msg.startswith("reconnecting in")
    ]


async def test_each_reconnect_after_a_working_connection_waits_the_first_step(
    live: LiveFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Without the reset, the third reconnect would wait 1 to 2 s."""
    caplog.set_level(logging.INFO, logger="app.client")
    seqs: list[int] = []
    async with live() as server, PricefeedClient(server.http) as client:
        closes = seen = 0
        async for tick in client.watch(["AAPL"]):
            seqs.append(tick["seq"])
            if len(reconnect_delays(caplog)) < closes:
                continue  # a frame the closed connection had already delivered
            seen += 1
            if seen == 3:  # this connection worked: now drop it
                if closes == 3:
                    break
                await server.app.state.streams.close_all(CloseCode.GOING_AWAY, "test")
                closes, seen = closes + 1, 0

    delays = reconnect_delays(caplog)
    assert len(delays) == 3
    first = client_module.BACKOFF_FIRST_SECONDS
    assert all(first / 2 <= d <= first for d in delays), delays
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "resumed without gap or repeat"


async def test_an_unknown_symbol_is_refused_with_its_close_code(live: LiveFactory) -> None:
    async with live() as server, PricefeedClient(server.http) as client:
        with pytest.raises(StreamRefused) as refused:
            async for _ in client.watch(["NOPE"]):
                pass
    assert refused.value.code is CloseCode.UNKNOWN_SYMBOL
    assert "4404" in str(refused.value)


async def test_an_instrument_disabled_while_watched_is_dropped_and_the_rest_watched(
    live: LiveFactory, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="app.client")
    await asyncio.to_thread(add_instrument, database_url, "XRP-USD")
    async with (
        live(instrument_poll_seconds=0.2) as server,
        PricefeedClient(server.http) as client,
    ):
        disabling: asyncio.Task[str] | None = None
        after: list[str] = []
        async with asyncio.timeout(15):
            async for tick in client.watch(["AAPL", "XRP-USD"]):
                if disabling is None and tick["symbol"] == "XRP-USD":
                    disabling = asyncio.create_task(
                        asyncio.to_thread(disable_instrument, database_url, "XRP-USD")
                    )
                if "no longer available" in caplog.text:
                    after.append(tick["symbol"])
                    if len(after) == 10:
                        break
        assert disabling is not None and await disabling == "disabled XRP-USD"
        assert after == ["AAPL"] * 10
        assert "XRP-USD is no longer available; watching AAPL" in caplog.text

        await asyncio.to_thread(add_instrument, database_url, "XRP-USD")  # back again
        async with httpx.AsyncClient(base_url=server.http) as http:
            async with asyncio.timeout(5):
                while (
                    "XRP-USD"
                    not in (
                        await http.get(
                            "/v1/symbols", headers={"Authorization": f"Bearer {token()}"}
                        )
                    ).text
                ):
                    await asyncio.sleep(0.05)
        disabled_again: asyncio.Task[str] | None = None
        with pytest.raises(StreamRefused) as refused:
            async with asyncio.timeout(15):
                async for _tick in client.watch(["XRP-USD"]):  # streams, until disabled
                    if disabled_again is None:
                        disabled_again = asyncio.create_task(
                            asyncio.to_thread(disable_instrument, database_url, "XRP-USD")
                        )
        assert refused.value.code is CloseCode.UNKNOWN_SYMBOL
        assert "XRP-USD is no longer available" in str(refused.value)
        assert disabled_again is not None and await disabled_again == "disabled XRP-USD"
