"""app/feed/resume.py, through the producer: a new producer takes each symbol's seq from the
newest tick proven published (the store, or what it witnessed go out), never below what the
database's history holds; from the database alone it resumes past a margin (ticks may have
gone out unwritten) rather than reuse a seq; with neither store nor database to ask, it
publishes nothing. Candles the store lost go on from the database's."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal

import pytest

from app.broker import Broker
from app.feed.leader import LocalLease
from app.feed.producer import Producer
from app.feed.sources import Quote
from app.feed.sources.simulated import SimulatedSource
from app.feed.witness import PublishedTicks
from app.history.records import HistoryRecords
from app.history.writer import HistoryWriter
from app.instruments.catalog import Catalog
from app.instruments.repository import InstrumentInfo
from app.prices.store import MemoryTickStore
from app.prices.ticks import encode_tick
from tests.history.conftest import HistoryDatabase

pytestmark = pytest.mark.postgres

AAPL = InstrumentInfo("AAPL", "Apple", "equity", 2, Decimal("190.00"))
MARGIN = 10


@asynccontextmanager
async def memory_broker() -> AsyncIterator[Broker]:
    broker = Broker("memory://")
    await broker.connect()
    try:
        yield broker
    finally:
        await broker.disconnect()


def producer(
    broker: Broker,
    db: HistoryDatabase,
    *,
    store: MemoryTickStore | None = None,
    witness: PublishedTicks | None = None,
) -> Producer:
    return Producer(
        source=SimulatedSource(ticks_per_second=50, seed=3),
        instruments=Catalog([AAPL]),
        store=store or MemoryTickStore(retention=1000, candles_kept=10),
        broker=broker,
        lease=LocalLease(),
        checkpoint_margin=MARGIN,
        history=HistoryWriter(HistoryRecords(db.engine), max_ticks=10_000, days=7),
        witness=witness,
    )


async def history_up_to(db: HistoryDatabase, seq: int) -> None:
    """What the database's history holds: AAPL 1..seq (the writer a flush behind)."""
    now = time.time_ns() // 1_000_000
    ticks = [
        encode_tick(symbol="AAPL", price=Decimal("190.10"), ts=now, seq=n)
        for n in range(1, seq + 1)
    ]
    await HistoryRecords(db.engine).write(ticks, {})


async def publish(p: Producer, count: int) -> list[int]:
    """`count` quotes through `p`: the seqs they were published with."""
    store = p._store
    for _ in range(count):
        await p.emit_batch([Quote("AAPL", Decimal("190.20"))])
    history = await store.read_history("AAPL", since=None, limit=count)
    return [t.seq for t in history]


class TestSeqOfRecord:
    async def test_what_the_standby_saw_published_is_the_seq_of_record(
        self, history_db: HistoryDatabase
    ) -> None:
        """Redis lost everything and the leader died with it; history is a flush behind."""
        await history_up_to(history_db, 50)
        async with memory_broker() as broker:
            witness = PublishedTicks(broker, Catalog([AAPL]), keep=100)
            watching = asyncio.create_task(witness.run())
            old = producer(broker, history_db)  # the leader that dies, unwritten ticks and all
            try:
                last = 0
                while not witness.latest():  # until the witness watches
                    last = (await publish(old, 1))[-1]
                    await asyncio.sleep(0.02)
                last = (await publish(old, 20))[-1]
                while witness.latest()["AAPL"].seq != last:
                    await asyncio.sleep(0.02)
            finally:
                watching.cancel()
                await asyncio.gather(watching, return_exceptions=True)
            new = producer(broker, history_db, witness=witness)  # Redis restarted empty
            assert await publish(new, 3) == [last + 1, last + 2, last + 3]

    async def test_the_store_is_proof_ahead_of_history(self, history_db: HistoryDatabase) -> None:
        await history_up_to(history_db, 50)
        async with memory_broker() as broker:
            store = MemoryTickStore(retention=1000, candles_kept=10)
            last = (await publish(producer(broker, history_db, store=store), 70))[-1]
            assert await publish(producer(broker, history_db, store=store), 1) == [last + 1]

    async def test_history_alone_resumes_past_the_margin_never_reusing_a_seq(
        self, history_db: HistoryDatabase, caplog: pytest.LogCaptureFixture
    ) -> None:
        await history_up_to(history_db, 50)
        async with memory_broker() as broker:
            with caplog.at_level(logging.WARNING, logger="app.feed.producer"):
                assert await publish(producer(broker, history_db), 1) == [50 + MARGIN + 1]
        assert "newest published seq unknown" in caplog.text

    async def test_no_store_and_no_database_publishes_nothing_until_one_answers(
        self, history_db: HistoryDatabase, caplog: pytest.LogCaptureFixture
    ) -> None:
        await history_up_to(history_db, 50)
        store = MemoryTickStore(retention=1000, candles_kept=10)
        async with memory_broker() as broker:
            p = producer(broker, history_db, store=store)
            with caplog.at_level(logging.ERROR, logger="app.feed.producer"):
                async with history_db.outage():
                    running = asyncio.create_task(p.run())
                    try:
                        while "no seq of record for AAPL" not in caplog.text:
                            await asyncio.sleep(0.05)
                        assert await store.read_latest(["AAPL"]) == {}, "nothing published"
                    except BaseException:
                        running.cancel()
                        raise
                try:
                    while not await store.read_latest(["AAPL"]):
                        await asyncio.sleep(0.05)
                finally:
                    running.cancel()
                    await asyncio.gather(running, return_exceptions=True)
        first = (await store.read_history("AAPL", since=None, limit=10_000))[0]
        assert first.seq == 50 + MARGIN + 1

    async def test_the_forming_candle_goes_on_from_the_database(
        self, history_db: HistoryDatabase
    ) -> None:
        now = time.time_ns() // 1_000_000
        day = now - now % 86_400_000
        formed = (Decimal("195"), Decimal("201.5"), Decimal("180.25"), Decimal("190"), Decimal(7))
        await HistoryRecords(history_db.engine).write([], {("AAPL", "1d", day): formed})
        store = MemoryTickStore(retention=1000, candles_kept=10)
        async with memory_broker() as broker:
            await publish(producer(broker, history_db, store=store), 1)  # at 190.20
        (candle,) = await store.read_candles("AAPL", "1d", limit=1)
        assert (candle.start, candle.open, candle.high, candle.low, candle.close) == (
            day,
            Decimal("195"),
            Decimal("201.5"),
            Decimal("180.25"),
            Decimal("190.20"),
        ), "the day's candle, not a new one opened at the first tick after the restart"
