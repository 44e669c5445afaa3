"""FEED_SOURCE=coinbase against a local fake of the exchange's feed (tests/feed/fake_coinbase.py):
the source alone, in process, then a real `python -m app` serving what the fake sends."""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from app.backoff import Backoff
from app.feed.sources import Quote, SourceNotReady
from app.feed.sources.coinbase import CoinbaseSource, create
from app.feed.stats import FeedStats
from app.instruments.catalog import Catalog
from app.instruments.repository import InstrumentInfo
from tests.feed.fake_coinbase import FakeCoinbase
from tests.support import make_settings, open_stream, scrape_sample, server_process, token

BTC = InstrumentInfo("BTC-USD", "Bitcoin / US Dollar", "crypto", 2, Decimal("67250.00"))
ETH = InstrumentInfo("ETH-USD", "Ether / US Dollar", "crypto", 2, Decimal("3450.00"))
SOL = InstrumentInfo("SOL-USD", "Solana / US Dollar", "crypto", 4, Decimal("152.3000"))
AAPL = InstrumentInfo("AAPL", "Apple Inc.", "equity", 4, Decimal("189.2300"))


@dataclass
class Run:
    """A source streaming in the background: its quotes, in order, and its counts."""

    source: CoinbaseSource
    stats: FeedStats
    quotes: asyncio.Queue[Quote] = field(default_factory=asyncio.Queue)
    counts: dict[str, int] = field(default_factory=dict)

    async def next_quote(self, timeout: float = 5.0) -> Quote:
        return await asyncio.wait_for(self.quotes.get(), timeout)

    async def quote_for(self, symbol: str, timeout: float = 5.0) -> Quote:
        deadline = time.monotonic() + timeout
        while True:
            quote = await self.next_quote(max(deadline - time.monotonic(), 0.01))
            if quote.symbol == symbol:
                return quote

    def counted(self, key: str) -> int:
        for name, amount in self.stats.drain().items():
            self.counts[name] = self.counts.get(name, 0) + amount
        return self.counts.get(key, 0)


@contextlib.asynccontextmanager
async def streaming(
    fake: FakeCoinbase, catalog: Catalog, *, stale_seconds: float = 5.0
) -> AsyncIterator[Run]:
    stats = FeedStats("coinbase")
    source = CoinbaseSource(
        url=fake.url,
        stale_seconds=stale_seconds,
        stats=stats,
        backoff=Backoff(base=0.05, cap=0.2),
    )
    run = Run(source=source, stats=stats)

    async def pump() -> None:
        async for batch in source.stream(catalog, {}):
            for quote in batch:
                run.quotes.put_nowait(quote)

    task = asyncio.create_task(pump())
    try:
        yield run
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert not task.done() or task.cancelled(), "stream never raises for upstream trouble"


@pytest.fixture
async def fake() -> AsyncIterator[FakeCoinbase]:
    async with FakeCoinbase() as upstream:
        yield upstream


def subscribed_to(fake: FakeCoinbase, *products: str) -> Any:
    return lambda: set(products) <= fake.subscribed()


class TestTicks:
    async def test_a_ticker_becomes_a_quote_with_every_field(self, fake: FakeCoinbase) -> None:
        async with streaming(fake, Catalog([AAPL, BTC, ETH])) as run:
            await fake.wait_for(subscribed_to(fake, "BTC-USD", "ETH-USD"))
            sent = await fake.ticker("BTC-USD", "67251.37", time="2026-12-07T16:00:00.123456Z")
            quote = await run.next_quote()

        assert fake.subscribes()[0] == {
            "type": "subscribe",
            "product_ids": ["BTC-USD", "ETH-USD"],  # the crypto instruments only
            "channels": ["ticker", "heartbeat"],
        }
        assert quote == Quote(
            symbol="BTC-USD",
            price=Decimal("67251.37"),
            bid=Decimal(sent["best_bid"]),
            ask=Decimal(sent["best_ask"]),
            volume=Decimal(sent["volume_24h"]),
            size=Decimal(sent["last_size"]),
            side="buy",
            source_ts=calendar.timegm((2026, 12, 7, 16, 0, 0)) * 1000 + 123,  # ms, truncated
        )
        assert str(quote.price) == "67251.37" and str(quote.bid) == "67250.00"

    async def test_optional_fields_may_be_missing(self, fake: FakeCoinbase) -> None:
        async with streaming(fake, Catalog([BTC])) as run:
            await fake.wait_for(subscribed_to(fake, "BTC-USD"))
            fields = dict.fromkeys(("best_bid", "best_ask", "last_size", "side", "time"))
            await fake.ticker("BTC-USD", "67250.10", volume_24h="0.00000000", **fields)
            quote = await run.next_quote()
        assert quote == Quote(symbol="BTC-USD", price=Decimal("67250.10"))

    async def test_what_arrived_together_comes_out_as_one_batch(self, fake: FakeCoinbase) -> None:
        source = CoinbaseSource(url=fake.url, stale_seconds=5, stats=FeedStats("coinbase"))
        stream = source.stream(Catalog([BTC, ETH]), {})
        try:
            first = asyncio.create_task(anext(stream))
            await fake.wait_for(subscribed_to(fake, "BTC-USD", "ETH-USD"))
            await fake.ticker("BTC-USD", "67250.01")
            assert [q.price for q in await first] == [Decimal("67250.01")]
            # Nobody asks for the next batch while these arrive: they wait, read, in one.
            for cents in range(2, 6):
                await fake.ticker("BTC-USD", f"67250.0{cents}")
                await fake.ticker("ETH-USD", f"3450.0{cents}")
            await asyncio.sleep(0.3)
            batch = await asyncio.wait_for(anext(stream), 5)
        finally:
            await stream.aclose()
        assert [q.symbol for q in batch] == ["BTC-USD", "ETH-USD"] * 4, "in arrival order"
        assert [q.price for q in batch[::2]] == [Decimal(f"67250.0{c}") for c in range(2, 6)]

    async def test_heartbeats_keep_the_sequence_and_make_no_quote(self, fake: FakeCoinbase) -> None:
        async with streaming(fake, Catalog([BTC])) as run:
            await fake.wait_for(subscribed_to(fake, "BTC-USD"))
            await fake.ticker("BTC-USD", "67250.01")
            await fake.heartbeat("BTC-USD")
            await fake.heartbeat("BTC-USD")
            await fake.ticker("BTC-USD", "67250.02")
            prices = [(await run.next_quote()).price for _ in range(2)]
            assert run.counted("gaps|coinbase") == 0
        assert prices == [Decimal("67250.01"), Decimal("67250.02")]


class TestBadMessages:
    async def test_garbage_is_counted_and_skipped_and_ticks_keep_flowing(
        self, fake: FakeCoinbase
    ) -> None:
        async with streaming(fake, Catalog([BTC, AAPL])) as run:
            await fake.wait_for(subscribed_to(fake, "BTC-USD"))
            for frame in (
                "not json at all",
                "[1, 2, 3]",
                '{"no": "type"}',
                '{"type": "ticker", "product_id": "BTC-USD", "price": "1.00"}',  # no sequence
                '{"type": "ticker", "sequence": 5, "price": "1.00"}',  # no product
                '{"type": "ticker", "product_id": "BTC-USD", "sequence": "7", "price": "1"}',
            ):
                await fake.send_raw(frame)
            await fake.ticker("BTC-USD", "abc")
            await fake.ticker("BTC-USD", "67250.011")  # BTC-USD is quoted to 2 decimals
            await fake.ticker("BTC-USD", "67250.01", best_bid="-1")
            await fake.ticker("BTC-USD", "67250.01", side="long")
            await fake.ticker("BTC-USD", "67250.01", time="yesterday")
            await fake.send_raw(orjson_ticker(fake, "DOGE-USD"))
            await fake.send_raw(orjson_ticker(fake, "AAPL"))  # ours, but not crypto
            await fake.send_raw('{"type": "status", "products": []}')  # a type we do not read
            await fake.ticker("BTC-USD", "67250.99")
            quote = await run.next_quote()

            assert quote.price == Decimal("67250.99"), "only the good ticker came through"
            assert {
                reason: run.counted(f"rejected|coinbase|{reason}")
                for reason in (
                    "malformed",
                    "bad_price",
                    "too_many_decimals",
                    "bad_bid",
                    "bad_side",
                    "bad_time",
                    "unknown_symbol",
                )
            } == {
                "malformed": 6,
                "bad_price": 1,
                "too_many_decimals": 1,
                "bad_bid": 1,
                "bad_side": 1,
                "bad_time": 1,
                "unknown_symbol": 2,
            }
        assert fake.connections == 1, "nothing malformed is worth a reconnect"


def orjson_ticker(fake: FakeCoinbase, product: str) -> str:
    message = fake.ticker_message(product, sequence=fake.next_sequence(product))
    return orjson.dumps(message).decode()


class TestSequence:
    async def test_a_gap_is_counted_and_the_quote_still_goes_out(self, fake: FakeCoinbase) -> None:
        async with streaming(fake, Catalog([BTC])) as run:
            await fake.wait_for(subscribed_to(fake, "BTC-USD"))
            await fake.ticker("BTC-USD", "67250.01")
            await fake.ticker("BTC-USD", "67250.02", skip=3)
            prices = [(await run.next_quote()).price for _ in range(2)]
            assert run.counted("gaps|coinbase") == 1
        assert prices == [Decimal("67250.01"), Decimal("67250.02")]

    async def test_a_sequence_at_or_below_the_last_is_skipped_and_counted(
        self, fake: FakeCoinbase
    ) -> None:
        async with streaming(fake, Catalog([BTC])) as run:
            await fake.wait_for(subscribed_to(fake, "BTC-USD"))
            first = await fake.ticker("BTC-USD", "67250.01")
            await fake.ticker("BTC-USD", "67250.02", sequence=first["sequence"])  # a repeat
            await fake.ticker("BTC-USD", "67250.03", sequence=first["sequence"] - 1)  # late
            await fake.ticker("BTC-USD", "67250.04")
            prices = [(await run.next_quote()).price for _ in range(2)]
            assert run.counted("rejected|coinbase|stale_sequence") == 2
            assert run.counted("gaps|coinbase") == 0
        assert prices == [Decimal("67250.01"), Decimal("67250.04")]


class TestReconnect:
    async def test_a_close_mid_stream_reconnects_resubscribes_and_flows_again(
        self, fake: FakeCoinbase, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.WARNING, "app.feed.sources.coinbase")
        async with streaming(fake, Catalog([BTC])) as run:
            await fake.wait_for(subscribed_to(fake, "BTC-USD"))
            await fake.ticker("BTC-USD", "67250.01")
            await run.next_quote()
            await fake.close(1011, "going away")
            await fake.wait_for(lambda: len(fake.subscribes()) == 2)
            # The fake's sequence carried on past what the source saw: no gap after a reconnect.
            await fake.ticker("BTC-USD", "67250.02", skip=5)
            quote = await run.next_quote()
            assert run.counted("gaps|coinbase") == 0
        assert quote.price == Decimal("67250.02")
        assert fake.connections == 2
        assert fake.subscribes()[1]["product_ids"] == ["BTC-USD"]
        assert "upstream closed the connection" in caplog.text or "lost" in caplog.text
        assert "reconnecting in" in caplog.text

    async def test_silence_past_the_stale_limit_reconnects(
        self, fake: FakeCoinbase, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.WARNING, "app.feed.sources.coinbase")
        async with streaming(fake, Catalog([BTC]), stale_seconds=0.5) as run:
            await fake.wait_for(subscribed_to(fake, "BTC-USD"))
            await fake.ticker("BTC-USD", "67250.01")
            await run.next_quote()
            await fake.wait_for(lambda: fake.connections == 2)  # nothing sent: silence
            await fake.wait_for(lambda: len(fake.subscribes()) == 2)
            await fake.ticker("BTC-USD", "67250.02")
            quote = await run.next_quote()
        assert quote.price == Decimal("67250.02")
        assert "upstream silent for" in caplog.text

    async def test_heartbeats_alone_keep_the_connection(self, fake: FakeCoinbase) -> None:
        async with streaming(fake, Catalog([BTC]), stale_seconds=0.5) as run:
            await fake.wait_for(subscribed_to(fake, "BTC-USD"))
            for _ in range(8):  # twice the stale limit, with a heartbeat every 0.1 s
                await fake.heartbeat("BTC-USD")
                await asyncio.sleep(0.1)
            await fake.ticker("BTC-USD", "67250.01")
            await run.next_quote()
        assert fake.connections == 1

    async def test_a_producer_held_up_past_the_stale_limit_does_not_reconnect(
        self, fake: FakeCoinbase
    ) -> None:
        source = CoinbaseSource(url=fake.url, stale_seconds=0.5, stats=FeedStats("coinbase"))
        stream = source.stream(Catalog([BTC]), {})
        try:
            first = asyncio.create_task(anext(stream))
            await fake.wait_for(subscribed_to(fake, "BTC-USD"))
            await fake.ticker("BTC-USD", "67250.01")
            await first
            for _ in range(10):  # the upstream talks; nobody takes a batch for a second
                await fake.ticker("BTC-USD", "67250.02")
                await asyncio.sleep(0.1)
            batch = await asyncio.wait_for(anext(stream), 5)
        finally:
            await stream.aclose()
        assert len(batch) == 10 and fake.connections == 1

    async def test_an_error_is_counted_and_reconnects(
        self, fake: FakeCoinbase, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.WARNING, "app.feed.sources.coinbase")
        async with streaming(fake, Catalog([BTC])) as run:
            await fake.wait_for(subscribed_to(fake, "BTC-USD"))
            await fake.error("Internal error", "try again")
            await fake.wait_for(lambda: len(fake.subscribes()) == 2)
            await fake.ticker("BTC-USD", "67250.01")
            await run.next_quote()
            assert run.counted("rejected|coinbase|upstream_error") == 1
        assert "upstream error: Internal error (try again)" in caplog.text

    async def test_a_product_the_upstream_refuses_is_left_out(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.WARNING, "app.feed.sources.coinbase")
        async with (
            FakeCoinbase(valid_products={"BTC-USD"}) as fake,
            streaming(fake, Catalog([BTC, ETH])) as run,
        ):
            await fake.wait_for(subscribed_to(fake, "BTC-USD"))
            await fake.ticker("BTC-USD", "67250.01")
            await run.next_quote()
            assert run.counted("rejected|coinbase|upstream_error") == 1
        assert [s["product_ids"] for s in fake.subscribes()] == [
            ["BTC-USD", "ETH-USD"],
            ["BTC-USD"],
        ]
        assert "the upstream refused ETH-USD (ETH-USD is not a valid product)" in caplog.text

    async def test_an_unreachable_upstream_is_retried_with_growing_delays(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.WARNING, "app.feed.sources.coinbase")
        async with FakeCoinbase() as fake:
            url = fake.url  # closed below: nothing listens there any more
        stats = FeedStats("coinbase")
        source = CoinbaseSource(
            url=url,
            stale_seconds=1,
            stats=stats,
            backoff=Backoff(base=0.02, cap=0.08, rng=lambda: 1.0),
        )
        stream = source.stream(Catalog([BTC]), {})
        task = asyncio.create_task(anext(stream))
        deadline = time.monotonic() + 10
        while caplog.text.count("reconnecting in") < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert not task.done(), "stream keeps trying; it does not raise"
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        lines = [r.getMessage() for r in caplog.records if "reconnecting in" in r.getMessage()]
        assert lines[0].startswith(f"coinbase: cannot connect to {url}")
        assert [line.split("reconnecting in ")[1] for line in lines[:4]] == [
            "0.02s (attempt 1)",
            "0.04s (attempt 2)",
            "0.08s (attempt 3)",
            "0.08s (attempt 4)",
        ]


class TestCatalog:
    async def test_an_instrument_added_or_disabled_is_subscribed_without_reconnecting(
        self, fake: FakeCoinbase
    ) -> None:
        catalog = Catalog([BTC, ETH, AAPL])
        async with streaming(fake, catalog) as run:
            await fake.wait_for(subscribed_to(fake, "BTC-USD", "ETH-USD"))
            catalog.replace([BTC, SOL, AAPL])  # SOL-USD added, ETH-USD disabled
            await fake.wait_for(lambda: fake.subscribed() == {"BTC-USD", "SOL-USD"})
            await fake.ticker("SOL-USD", "152.3175")
            quote = await run.quote_for("SOL-USD")
        assert quote.price == Decimal("152.3175")
        channels = ["ticker", "heartbeat"]
        assert fake.requests[1:] == [
            {"type": "unsubscribe", "product_ids": ["ETH-USD"], "channels": channels},
            {"type": "subscribe", "product_ids": ["SOL-USD"], "channels": channels},
        ]
        assert fake.connections == 1

    async def test_with_no_crypto_instrument_it_waits_for_one(self, fake: FakeCoinbase) -> None:
        catalog = Catalog([AAPL])
        async with streaming(fake, catalog) as run:
            await asyncio.sleep(0.3)
            assert fake.connections == 0, "nothing to subscribe to: no connection"
            catalog.replace([AAPL, BTC])
            await fake.wait_for(subscribed_to(fake, "BTC-USD"))
            await fake.ticker("BTC-USD", "67250.01")
            await run.next_quote()


class TestSettings:
    @pytest.mark.parametrize("url", ["https://ws-feed.exchange.coinbase.com", "wss://", "nope"])
    def test_an_upstream_url_that_is_not_websocket_refuses_to_start(
        self, url: str, database_url: str
    ) -> None:
        settings = make_settings(database_url, feed_source="coinbase", feed_upstream_url=url)
        with pytest.raises(SourceNotReady, match="FEED_UPSTREAM_URL must be a ws:// or wss://"):
            create(settings, FeedStats("coinbase"))


# ---------------------------------------------------------------- a real server


async def readyz_feed(http: str) -> str:
    async with httpx.AsyncClient() as client:
        body = (await client.get(f"{http}/readyz")).json()
    return str(body["feed"]["status"])


async def poll(condition: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "never happened"
        await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_a_server_serves_the_exchange_and_rides_out_its_trouble(
    tmp_path: Path, database_url: str
) -> None:
    async with FakeCoinbase() as fake:
        fake.start_ticking(interval=0.05)
        server = server_process(
            tmp_path,
            "coinbase",
            database_url,
            FEED_SOURCE="coinbase",
            FEED_UPSTREAM_URL=fake.url,
            FEED_STALE_SECONDS="1",
        )
        server.start()
        try:
            await server.wait_ready()
            async with open_stream(f"{server.ws}/v1/ws/prices/BTC-USD?token={token()}") as stream:
                tick = await stream.recv_type("tick", timeout=10)
                assert tick["symbol"] == "BTC-USD"
                assert isinstance(tick["source_ts"], int)
                assert (tick["size"], tick["side"]) == ("0.00026100", "buy")
                assert (tick["bid"], tick["ask"]) == ("67250.00", "67250.02")

                await fake.close()
                await fake.wait_for(lambda: fake.connections == 2 and bool(fake.subscribed()))
                resubscribed_ms = time.time_ns() // 1_000_000
                after = await stream.recv_type("tick", timeout=10)
                while after["source_ts"] < resubscribed_ms:  # sent before the close
                    after = await stream.recv_type("tick", timeout=10)
                assert after["seq"] > tick["seq"], "the same stream carries on after a reconnect"

            await fake.send_raw("this is not JSON")
            await fake.ticker("BTC-USD", "67250.50", skip=4)
            gaps = 'pricefeed_feed_upstream_gaps_total{source="coinbase"}'
            malformed = 'pricefeed_feed_rejected_total{reason="malformed",source="coinbase"}'

            async def counted() -> bool:
                return await scrape_sample(server, gaps) >= 1 and (
                    await scrape_sample(server, malformed) >= 1
                )

            await poll(counted)

            fake.silent = True

            async def stale() -> bool:
                return await readyz_feed(server.http) == "stale"

            await poll(stale)
            fake.silent = False

            async def ok() -> bool:
                return await readyz_feed(server.http) == "ok"

            await poll(ok)
            log = server.log()
        finally:
            server.stop()
    assert "coinbase: upstream silent for" in log
    assert "Traceback" not in log
