"""app/feed/producer.py: whatever the source, one writer of seq — a batch's quotes go out in
order per symbol, each with the next seq; optional fields reach the tick."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal

from app.broker import Broker, price_channel
from app.feed.leader import LocalLease
from app.feed.producer import Producer
from app.feed.sources import Instruments, Quote
from app.instruments.catalog import Catalog
from app.instruments.repository import InstrumentInfo
from app.prices.store import MemoryTickStore

AAPL = InstrumentInfo("AAPL", "Apple", "equity", 2, Decimal("190.00"))
MSFT = InstrumentInfo("MSFT", "Microsoft", "equity", 2, Decimal("410.00"))


class OneBatch:
    """Yields one given batch, then nothing."""

    name = "test"

    def __init__(self, batch: list[Quote]) -> None:
        self._batch = batch

    async def stream(
        self, instruments: Instruments, start_prices: dict[str, Decimal]
    ) -> AsyncIterator[list[Quote]]:
        yield self._batch
        await asyncio.Event().wait()


async def test_a_batch_goes_out_in_order_per_symbol() -> None:
    prices = ["1.01", "1.02", "1.03", "1.04", "1.05"]
    batch = [Quote("AAPL", Decimal(p)) for p in prices]
    batch.insert(2, Quote("MSFT", Decimal("2.00"), size=Decimal("5"), side="buy", source_ts=7))
    store = MemoryTickStore(retention=100, candles_kept=10)
    broker = Broker("memory://")
    await broker.connect()
    producer = Producer(
        source=OneBatch(batch),
        instruments=Catalog([AAPL, MSFT]),
        store=store,
        broker=broker,
        lease=LocalLease(),
    )
    try:
        async with broker.subscribe_bursts(
            [price_channel("AAPL"), price_channel("MSFT")], lambda burst: None
        ):
            task = asyncio.create_task(producer.run())
            for _ in range(200):
                if len(await store.read_history("AAPL", since=0, limit=10)) == 5:
                    break
                await asyncio.sleep(0.01)
            task.cancel()
    finally:
        await broker.disconnect()

    aapl = await store.read_history("AAPL", since=0, limit=10)
    assert [t.seq for t in aapl] == [1, 2, 3, 4, 5]
    assert [t.as_dict()["price"] for t in aapl] == prices
    assert "size" not in aapl[0].as_dict()  # only the fields the source had
    (msft,) = await store.read_history("MSFT", since=0, limit=10)
    body = msft.as_dict()
    assert (body["seq"], body["size"], body["side"], body["source_ts"]) == (1, "5", "buy", 7)
    # Candle volume sums each trade's size.
    (candle,) = await store.read_candles("MSFT", "1m", limit=1)
    assert candle.volume == Decimal("5")
