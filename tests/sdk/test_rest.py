"""The SDK's REST methods against a real server: typed answers (Decimal prices, int seqs,
UTC datetimes) and the service's refusals as ApiError; the sync wrapper does the same."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC
from decimal import Decimal

import pytest
from pricefeed_client import (
    ApiError,
    Candle,
    PricefeedClient,
    Symbol,
    SyncPricefeedClient,
    Tick,
)

from tests.sdk.support import Tokens
from tests.support import SEED_SYMBOLS, LiveApp

LiveFactory = Callable[..., AbstractAsyncContextManager[LiveApp]]


async def test_latest_prices_history_and_candles_are_typed(live: LiveFactory) -> None:
    async with live() as server, PricefeedClient(server.http) as feed:
        async with asyncio.timeout(10):
            latest = None
            while latest is None or latest.seq < 5:  # a history to read
                try:
                    latest = await feed.latest("aapl")
                except ApiError as error:  # 503 "no price yet": the feed is starting
                    if error.status != 503:
                        raise
                await asyncio.sleep(0.05)
        both = await feed.prices(["MSFT", "AAPL"])
        history = await feed.history("AAPL", since=latest.seq - 5, limit=3)
        candles = await feed.candles("AAPL", interval="1m", limit=2)

    assert isinstance(latest, Tick) and latest.symbol == "AAPL"
    assert isinstance(latest.price, Decimal) and latest.price > 0
    assert isinstance(latest.seq, int) and latest.time.tzinfo is UTC
    assert [t.symbol for t in both] == ["MSFT", "AAPL"]
    assert [t.seq for t in history] == [history[0].seq, history[0].seq + 1, history[0].seq + 2]
    assert history[0].seq == latest.seq - 4
    assert candles and all(isinstance(c, Candle) and c.low <= c.high for c in candles)


async def test_symbols_say_what_the_credentials_may_read(live: LiveFactory) -> None:
    tokens = Tokens(symbols=["AAPL"])
    async with live() as server, PricefeedClient(server.http, token_provider=tokens) as feed:
        symbols = await feed.symbols()
    assert all(isinstance(s, Symbol) for s in symbols)
    assert sorted(s.symbol for s in symbols) == sorted(SEED_SYMBOLS)
    assert {s.symbol for s in symbols if s.entitled} == {"AAPL"}


async def test_refusals_are_api_errors_with_the_services_code(live: LiveFactory) -> None:
    async with live() as server:
        async with PricefeedClient(server.http) as feed:
            with pytest.raises(ApiError) as unknown:
                await feed.latest("NOPE")
        async with PricefeedClient(server.http, client_secret="wrong") as feed:
            with pytest.raises(ApiError) as refused:
                await feed.latest("AAPL")
    assert (unknown.value.status, unknown.value.code) == (404, "unknown_symbol")
    assert refused.value.status == 401


async def test_the_sync_client_reads_and_watches_without_async(live: LiveFactory) -> None:
    def use(url: str) -> tuple[Tick, list[Tick]]:
        with SyncPricefeedClient(url) as feed:
            latest = feed.latest("AAPL")
            ticks = []
            for tick in feed.watch(["AAPL"]):
                ticks.append(tick)
                if len(ticks) == 5:
                    break
            return latest, ticks

    async with live() as server:
        latest, ticks = await asyncio.to_thread(use, server.http)
    assert latest.symbol == "AAPL"
    assert [t.seq for t in ticks] == list(range(ticks[0].seq, ticks[0].seq + 5))
    assert ticks[0].is_snapshot and not ticks[1].is_snapshot
