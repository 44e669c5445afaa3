"""app/client.py against a real uvicorn: `watch` reconnects with a backoff that starts over
once a connection delivered ticks, resumes without a gap, and raises StreamRefused carrying a
CloseCode for what reconnecting cannot fix."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import pytest

from app import client as client_module
from app.client import PricefeedClient, StreamRefused
from app.errors import CloseCode
from tests.support import LiveApp

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
