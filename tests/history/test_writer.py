"""app/history/writer.py on a real database (SQLite and PostgreSQL): every published tick is
kept exactly once, candles (the forming one too) as their newest state; an outage is ridden
out from the buffer and caught up; a full buffer drops its oldest, counted; and rows past
HISTORY_DAYS go, in chunks."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import pytest
from sqlalchemy import event, text

from app.history.records import HistoryRecords
from app.history.status import MemoryHistoryReport
from app.history.writer import HistoryWriter
from app.prices.candles import Candle
from app.prices.store import Run
from app.prices.ticks import Tick, encode_tick
from tests.history.conftest import HistoryDatabase

pytestmark = pytest.mark.postgres


def ticks_of(symbol: str, seqs: range, *, ts: int | None = None) -> list[Tick]:
    now = ts if ts is not None else time.time_ns() // 1_000_000
    return [
        encode_tick(symbol=symbol, price=Decimal(f"{100 + seq}.25"), ts=now + seq, seq=seq)
        for seq in seqs
    ]


async def stored(db: HistoryDatabase, symbol: str) -> list[tuple[int, str]]:
    async with db.engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT seq, frame FROM ticks WHERE symbol = :s ORDER BY seq"), {"s": symbol}
        )
        return [(int(r[0]), r[1]) for r in rows]


async def until(condition, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.05)


class Running:
    """A writer's `run` as a task, cancelled on exit (as the producer's term ends)."""

    def __init__(self, writer: HistoryWriter, **kwargs: object) -> None:
        self.writer, self._kwargs = writer, kwargs

    async def __aenter__(self) -> HistoryWriter:
        self._task = asyncio.create_task(self.writer.run(**self._kwargs))  # type: ignore[arg-type]
        return self.writer

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


class TestEveryTickOnce:
    async def test_offered_twice_and_backfilled_still_once(self, history_db) -> None:  # type: ignore[no-untyped-def]
        writer = HistoryWriter(HistoryRecords(history_db.engine), max_ticks=100_000, days=7)
        published = ticks_of("AAPL", range(1, 1201))

        async def backfill() -> list[Run]:  # a new leader's look at the store: overlapping
            return [Run("AAPL", published[900:1100])]

        async with Running(writer, backfill=backfill):
            for start in range(0, 1200, 100):
                writer.offer([Run("AAPL", published[start : start + 100])])
                await asyncio.sleep(0)
            writer.offer([Run("AAPL", published[1000:1200])])  # a retried batch, say

            async def all_there() -> bool:
                return len(await stored(history_db, "AAPL")) == 1200 and writer.pending == 0

            await until(all_there)
        rows = await stored(history_db, "AAPL")
        assert [seq for seq, _ in rows] == list(range(1, 1201))
        assert [frame for _, frame in rows] == [t.frame for t in published], "as published"

    async def test_a_large_batch_over_kept_rows_adds_only_the_new(self, history_db) -> None:  # type: ignore[no-untyped-def]
        """Small batches and large ones (PostgreSQL: unnest below 1,000 ticks, COPY from
        there) alike."""
        records = HistoryRecords(history_db.engine)
        published = ticks_of("AAPL", range(1, 3001))
        await records.write(published[1000:1500], {})  # small
        await records.write(published, {})  # large, over them
        await records.write(published[:2000], {})  # large, all kept already
        rows = await stored(history_db, "AAPL")
        assert rows == [(t.seq, t.frame) for t in published]

    async def test_many_symbols_interleaved_in_one_write_all_kept(self, history_db) -> None:  # type: ignore[no-untyped-def]
        """A flush holds runs of many symbols, interleaved as they were published, and every
        interval's candle of each: written in one transaction (sorted by symbol on the way,
        candles from one statement's arrays on PostgreSQL), each tick and candle is kept."""
        records = HistoryRecords(history_db.engine)
        symbols = ["MSFT", "AAPL", "TSLA"]
        published = {s: ticks_of(s, range(1, 1501)) for s in symbols}
        interleaved = [
            tick
            for start in range(0, 1500, 7)
            for s in symbols
            for tick in published[s][start : start + 7]
        ]

        def candle(price: str) -> tuple[Decimal, ...]:
            p = Decimal(price)
            return (p, p + 1, p - 1, p, Decimal("2"))

        await records.write(
            interleaved[:2000],
            {(s, i, 60_000): candle(f"{n}.5") for n, s in enumerate(symbols) for i in ("1m", "1h")},
        )
        await records.write(  # the rest, one candle grown and a new minute's
            interleaved[2000:],
            {("AAPL", "1m", 60_000): candle("7.25"), ("AAPL", "1m", 120_000): candle("8")},
        )
        for s in symbols:
            assert await stored(history_db, s) == [(t.seq, t.frame) for t in published[s]]
        async with history_db.engine.connect() as conn:
            rows = await conn.execute(
                text(
                    'SELECT symbol, "interval", start, open, high, low, close, volume'
                    ' FROM candles ORDER BY symbol, "interval", start'
                )
            )
            candles = [tuple(str(v) for v in row) for row in rows]
        assert candles == [
            ("AAPL", "1h", "60000", "1.5", "2.5", "0.5", "1.5", "2"),
            ("AAPL", "1m", "60000", "7.25", "8.25", "6.25", "7.25", "2"),
            ("AAPL", "1m", "120000", "8", "9", "7", "8", "2"),
            ("MSFT", "1h", "60000", "0.5", "1.5", "-0.5", "0.5", "2"),
            ("MSFT", "1m", "60000", "0.5", "1.5", "-0.5", "0.5", "2"),
            ("TSLA", "1h", "60000", "2.5", "3.5", "1.5", "2.5", "2"),
            ("TSLA", "1m", "60000", "2.5", "3.5", "1.5", "2.5", "2"),
        ]

    async def test_the_forming_candle_is_kept_as_it_grows(self, history_db) -> None:  # type: ignore[no-untyped-def]
        writer = HistoryWriter(HistoryRecords(history_db.engine), max_ticks=10_000, days=7)
        candle = Candle(
            start=60_000,
            open=Decimal("10.5"),
            high=Decimal("10.5"),
            low=Decimal("10.5"),
            close=Decimal("10.5"),
            volume=Decimal("1"),
        )

        async def read() -> list[tuple[str, ...]]:
            async with history_db.engine.connect() as conn:
                rows = await conn.execute(
                    text(
                        'SELECT "interval", start, open, high, low, close, volume FROM candles'
                        " WHERE symbol = 'AAPL' ORDER BY start"
                    )
                )
                return [tuple(str(v) for v in row) for row in rows]

        async with Running(writer):
            writer.offer([Run("AAPL", ticks_of("AAPL", range(1, 2)), [("1m", candle)])])
            await until(lambda: _has(read, 1))
            candle.high, candle.close, candle.volume = Decimal("11.75"), Decimal("11"), Decimal("3")
            writer.offer([Run("AAPL", ticks_of("AAPL", range(2, 3)), [("1m", candle)])])

            async def grown() -> bool:
                return (await read())[0][3] == "11.75"

            await until(grown)
        assert await read() == [("1m", "60000", "10.5", "11.75", "10.5", "11", "3")]


async def _has(read, count: int) -> bool:  # type: ignore[no-untyped-def]
    return len(await read()) == count


class TestOutage:
    async def test_writes_wait_in_the_buffer_and_catch_up(self, history_db) -> None:  # type: ignore[no-untyped-def]
        report = MemoryHistoryReport()
        writer = HistoryWriter(
            HistoryRecords(history_db.engine), max_ticks=100_000, days=7, report=report
        )
        published = ticks_of("MSFT", range(1, 3001))
        async with Running(writer):
            writer.offer([Run("MSFT", published[:1000])])
            await until(lambda: _count_is(history_db, "MSFT", 1000))
            async with history_db.outage():
                writer.offer([Run("MSFT", published[1000:2000])])

                async def failing() -> bool:
                    state = await report.read()
                    return state is not None and state.failing and state.health() == "degraded"

                await until(failing)
                writer.offer([Run("MSFT", published[2000:])])
                assert writer.pending >= 1000, "kept while the database is away"
            await until(lambda: _count_is(history_db, "MSFT", 3000))

            async def healthy() -> bool:
                state = await report.read()
                return state is not None and state.health() == "ok"

            await until(healthy)
        assert [seq for seq, _ in await stored(history_db, "MSFT")] == list(range(1, 3001))
        assert writer.dropped_total == 0

    async def test_a_full_buffer_drops_the_oldest_and_counts_them(self, history_db) -> None:  # type: ignore[no-untyped-def]
        report = MemoryHistoryReport()
        writer = HistoryWriter(
            HistoryRecords(history_db.engine), max_ticks=1000, days=7, report=report
        )
        published = ticks_of("TSLA", range(1, 1601))
        async with Running(writer):
            async with history_db.outage():
                for start in range(0, 1600, 200):
                    writer.offer([Run("TSLA", published[start : start + 200])])
                    await asyncio.sleep(0.05)  # writes fail meanwhile, and come back

                async def failed() -> bool:
                    return writer.failing

                # The outage lasts until a write failed: a flush that started inside it would
                # otherwise wait out a short outage in the driver's busy wait, and succeed.
                await until(failed)
            await until(lambda: _count_is(history_db, "TSLA", 1000))

            async def reported() -> bool:
                state = await report.read()
                return state is not None and state.dropped == 600

            await until(reported)
        assert [seq for seq, _ in await stored(history_db, "TSLA")] == list(range(601, 1601))
        assert writer.dropped_total == 600


async def _count_is(db: HistoryDatabase, symbol: str, count: int) -> bool:
    return len(await stored(db, symbol)) == count


class TestRetention:
    async def test_rows_past_the_days_kept_are_deleted_in_chunks(self, history_db) -> None:  # type: ignore[no-untyped-def]
        records = HistoryRecords(history_db.engine)
        day = 86_400_000
        now = time.time_ns() // 1_000_000
        old = ticks_of("AAPL", range(1, 2501), ts=now - 9 * day) + ticks_of(
            "MSFT", range(1, 1001), ts=now - 8 * day
        )
        recent = ticks_of("AAPL", range(2501, 2601), ts=now - day)
        old_candle = (Decimal(1), Decimal(2), Decimal(1), Decimal(2), Decimal(5))
        await records.write(
            old + recent,
            {
                ("AAPL", "1m", now - 9 * day - (now % 60_000)): old_candle,
                ("AAPL", "1m", now - (now % 60_000)): old_candle,
            },
        )
        deletes: list[str] = []

        def count_deletes(conn, cursor, statement, *args) -> None:  # type: ignore[no-untyped-def]
            if statement.lstrip().upper().startswith("DELETE FROM TICKS"):
                deletes.append(statement)

        event.listen(history_db.engine.sync_engine, "before_cursor_execute", count_deletes)
        deleted = await records.delete_older_than(now - 7 * day, intervals=["1m"], chunk=1000)
        event.remove(history_db.engine.sync_engine, "before_cursor_execute", count_deletes)

        assert deleted == 3500 + 1
        assert [seq for seq, _ in await stored(history_db, "AAPL")] == list(range(2501, 2601))
        assert await stored(history_db, "MSFT") == []
        async with history_db.engine.connect() as conn:
            starts = (await conn.execute(text("SELECT start FROM candles"))).scalars().all()
        assert starts == [now - (now % 60_000)], "the recent candle stays"
        # AAPL: 1,000, 1,000, then 500 (fewer: done); MSFT: 1,000, then none.
        assert len(deletes) == 3 + 2, "a chunk per transaction, never one big delete"


class TestFlushOnStop:
    """A process that stops gracefully writes what the buffer still holds (app/feed/__main__.py,
    the lifespan's shutdown), bounded: a database that is away costs the ticks, not the stop."""

    async def test_what_the_buffer_holds_when_the_term_ends_is_written(self, history_db) -> None:  # type: ignore[no-untyped-def]
        writer = HistoryWriter(HistoryRecords(history_db.engine), max_ticks=100_000, days=7)
        published = ticks_of("NVDA", range(1, 7001))
        async with Running(writer):
            pass  # the term ends before the first periodic write
        # offered last, just before the producer stopped: more than one transaction's worth
        candle = Candle(0, *(Decimal(1),) * 4, Decimal(7000))
        writer.offer([Run("NVDA", published, [("1m", candle)])])
        assert await writer.flush() == 0
        assert writer.pending == 0
        assert [seq for seq, _ in await stored(history_db, "NVDA")] == list(range(1, 7001))

    async def test_a_database_that_is_away_loses_them_and_the_stop_goes_on(
        self,
        history_db,  # type: ignore[no-untyped-def]
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        writer = HistoryWriter(HistoryRecords(history_db.engine), max_ticks=100_000, days=7)
        writer.offer([Run("AMD", ticks_of("AMD", range(1, 101)))])
        async with history_db.outage():
            left = await writer.flush(timeout=1.0)
        assert left == 100
        assert "stopping with 100 ticks not written" in caplog.text
        assert await stored(history_db, "AMD") == []


class HeldWrites:
    """Records whose every write waits until `release` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.writing = asyncio.Event()

    async def write(self, ticks: list[Tick], candles: object) -> None:
        self.writing.set()
        await self.release.wait()


async def test_a_write_in_flight_counts_in_the_write_lag() -> None:
    """The whole buffer goes into one write: while it is in the database (a lock waited on,
    a slow disk), those ticks are still not written, and the lag says so."""
    records = HeldWrites()
    writer = HistoryWriter(records, max_ticks=1_000, days=0)  # type: ignore[arg-type]
    ts = int(time.time() * 1000) - 3_000
    writer.offer([Run("AAPL", ticks_of("AAPL", range(1, 6), ts=ts))])
    running = asyncio.create_task(writer.run())
    try:
        await asyncio.wait_for(records.writing.wait(), 5)
        assert writer.pending == 0, "all taken into the write"
        assert writer.lag_seconds() >= 3.0
        records.release.set()

        async def caught_up() -> bool:
            return writer.lag_seconds() == 0.0

        await until(caught_up)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
