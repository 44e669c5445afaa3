"""History: how many ticks a second the history writer keeps up with, on PostgreSQL and on
SQLite side by side, and what it costs the producer per tick.

    python -m bench.history [--ticks 200000] [--batch 5000] [--pg postgresql://postgres@127.0.0.1:5432/postgres]

1. Writer throughput: `--ticks` ticks of 10 symbols written in transactions of `--batch`
   (the writer's MAX_BATCH_TICKS; 500, its flush size, too), into a freshly migrated
   database: SQLite (a file in a temp dir), and PostgreSQL through three statements —
   `unnest` (four arrays, one INSERT … SELECT … ON CONFLICT DO NOTHING), `executemany`
   (SQLAlchemy's dialect insert, one row per parameter set), and `COPY` (into a temp staging
   table, then INSERT … SELECT … ON CONFLICT DO NOTHING) — and what app/history/records.py
   runs: unnest below 1,000 ticks, COPY from there.
   Each number is the best of `--repeat` runs into an empty table.
2. Retention: rows a second `delete_older_than` removes in chunks of 5,000 (PostgreSQL and
   SQLite), beside the rows a second a feed writes: the case for (or against) partitioning.
3. The producer's cost: µs of its event loop per published tick, emitting batches of 10
   quotes into an in-process store and broker, without history and with the writer running
   in the same loop into SQLite and into PostgreSQL (the leader runs both there).

The machine (CPU, cores, Python) heads the output; numbers from a shared machine vary.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
from pathlib import Path

import asyncpg
from sqlalchemy import text
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app.broker import Broker
from app.feed.leader import LocalLease
from app.feed.producer import Producer
from app.feed.sources import Quote
from app.feed.sources.simulated import SimulatedSource
from app.history.models import TickRecord
from app.history.records import _TICKS_FROM_ARRAYS, HistoryRecords
from app.history.writer import HistoryWriter
from app.instruments.catalog import Catalog
from app.instruments.repository import InstrumentInfo
from app.prices.store import MemoryTickStore
from app.prices.ticks import Tick, encode_tick
from bench.report import machine_info

ROOT = Path(__file__).resolve().parent.parent
SYMBOLS = [f"SYM{i}" for i in range(10)]
DAY_MS = 86_400_000


def make_ticks(count: int, *, ts: int | None = None) -> list[Tick]:
    now = ts if ts is not None else time.time_ns() // 1_000_000
    ticks = []
    for n in range(count):
        symbol = SYMBOLS[n % len(SYMBOLS)]
        seq = n // len(SYMBOLS) + 1
        ticks.append(
            encode_tick(
                symbol=symbol,
                price=Decimal("100.25") + n % 97,
                ts=now + n // 50,
                seq=seq,
                bid=Decimal("100.20"),
                ask=Decimal("100.30"),
                volume=Decimal(n),
            )
        )
    return ticks


def migrate(url: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "alembic", "-x", f"url={url}", "upgrade", "head"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )


async def _fresh_pg(admin_dsn: str) -> tuple[str, Callable[[], Awaitable[None]]]:
    admin = await asyncpg.connect(admin_dsn)
    name = f"pricefeed_bench_{uuid.uuid4().hex[:10]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    host = admin_dsn.split("://", 1)[1].rsplit("/", 1)[0]
    url = f"postgresql+asyncpg://{host}/{name}"

    async def drop() -> None:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()

    return url, drop


Writer = Callable[[AsyncEngine, Sequence[Tick]], Awaitable[None]]


async def write_records(engine: AsyncEngine, ticks: Sequence[Tick]) -> None:
    await HistoryRecords(engine).write(ticks, {})


async def write_unnest(engine: AsyncEngine, ticks: Sequence[Tick]) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            _TICKS_FROM_ARRAYS,
            {
                "symbols": [t.symbol for t in ticks],
                "seqs": [t.seq for t in ticks],
                "ts": [t.ts for t in ticks],
                "frames": [t.frame for t in ticks],
            },
        )


async def write_executemany(engine: AsyncEngine, ticks: Sequence[Tick]) -> None:
    statement = postgresql_insert(TickRecord).on_conflict_do_nothing()
    async with engine.begin() as conn:
        await conn.execute(
            statement,
            [{"symbol": t.symbol, "seq": t.seq, "ts": t.ts, "frame": t.frame} for t in ticks],
        )


async def write_copy(engine: AsyncEngine, ticks: Sequence[Tick]) -> None:
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        pg: asyncpg.Connection = raw.driver_connection  # type: ignore[assignment]
        async with pg.transaction():
            await _copy(pg, ticks)


async def _copy(pg: asyncpg.Connection, ticks: Sequence[Tick]) -> None:
    await pg.execute(
        "CREATE TEMP TABLE IF NOT EXISTS ticks_stage (LIKE ticks INCLUDING DEFAULTS)"
        " ON COMMIT DELETE ROWS"
    )
    await pg.copy_records_to_table(
        "ticks_stage",
        records=[(t.symbol, t.seq, t.ts, t.frame) for t in ticks],
        columns=["symbol", "seq", "ts", "frame"],
    )
    await pg.execute("INSERT INTO ticks SELECT * FROM ticks_stage ON CONFLICT DO NOTHING")


async def empty(engine: AsyncEngine) -> None:
    """No rows, and (PostgreSQL) no dead ones either: sizes and speeds from a clean table."""
    postgres = engine.dialect.name == "postgresql"
    async with engine.begin() as conn:
        await conn.execute(text("TRUNCATE ticks" if postgres else "DELETE FROM ticks"))


async def throughput(engine: AsyncEngine, write: Writer, ticks: list[Tick], batch: int) -> float:
    await empty(engine)
    started = time.perf_counter()
    for start in range(0, len(ticks), batch):
        await write(engine, ticks[start : start + batch])
    elapsed = time.perf_counter() - started
    async with engine.connect() as conn:
        kept = (await conn.execute(text("SELECT count(*) FROM ticks"))).scalar()
    assert kept == len(ticks), (write.__name__, kept, len(ticks))
    return len(ticks) / elapsed


async def deletes_per_second(engine: AsyncEngine, count: int) -> float:
    await empty(engine)
    now = time.time_ns() // 1_000_000
    records = HistoryRecords(engine)
    old = make_ticks(count, ts=now - 9 * DAY_MS)
    for start in range(0, len(old), 5000):
        await records.write(old[start : start + 5000], {})
    started = time.perf_counter()
    deleted = await records.delete_older_than(now - 7 * DAY_MS, intervals=[], chunk=5000)
    elapsed = time.perf_counter() - started
    assert deleted == count
    return count / elapsed


async def producer_cost(engine: AsyncEngine | None, batches: int) -> float:
    """CPU µs of this process (its loop, and aiosqlite's thread) per published tick, batches
    of 10 quotes (one per symbol)."""
    instruments = Catalog([InstrumentInfo(s, s, "crypto", 2, Decimal("100")) for s in SYMBOLS])
    broker = Broker("memory://", queue_size=10_000_000)
    await broker.connect()
    history = None
    if engine is not None:
        history = HistoryWriter(HistoryRecords(engine), max_ticks=10_000_000, days=7)
    producer = Producer(
        source=SimulatedSource(ticks_per_second=1, seed=1),
        instruments=instruments,
        store=MemoryTickStore(retention=1000, candles_kept=10),
        broker=broker,
        lease=LocalLease(),
        history=history,
    )
    writing = asyncio.create_task(history.run()) if history is not None else None
    quotes = [Quote(s, Decimal("100.25")) for s in SYMBOLS]
    await producer.emit_batch(quotes)  # resumed, warmed up
    cpu_started = time.process_time()
    for _ in range(batches):
        await producer.emit_batch(quotes)
        await asyncio.sleep(0)  # let the writer (and the broker's queue) run, as in service
    if history is not None:
        while history.pending:
            await asyncio.sleep(0.01)
    cpu = time.process_time() - cpu_started
    if writing is not None:
        writing.cancel()
        await asyncio.gather(writing, return_exceptions=True)
    await broker.disconnect()
    return cpu / (batches * len(SYMBOLS)) * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ticks", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--deletes", type=int, default=100_000)
    parser.add_argument("--producer-batches", type=int, default=5000)
    parser.add_argument("--only-pg", action="store_true", help="part 1 on PostgreSQL only")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()

    info = machine_info()
    print(f"machine: {info.get('cpu')}, {info.get('cores')} cores, Python {info.get('python')}")
    print("(a shared machine: other work ran beside this)\n")
    ticks = make_ticks(args.ticks)

    with tempfile.TemporaryDirectory() as tmp:
        sqlite_url = f"sqlite+aiosqlite:///{tmp}/history.db"
        migrate(sqlite_url)
        sqlite = create_async_engine(sqlite_url)
        pg_url, drop_pg = await _fresh_pg(args.pg)
        migrate(pg_url)
        pg = create_async_engine(pg_url)
        try:
            rows: list[tuple[str, str, int, float]] = []
            size_per_tick = 0.0
            cases: list[tuple[str, str, AsyncEngine, Writer]] = [
                ("PostgreSQL", "used (records.py)", pg, write_records),
                ("PostgreSQL", "unnest", pg, write_unnest),
                ("PostgreSQL", "executemany", pg, write_executemany),
                ("PostgreSQL", "COPY + INSERT", pg, write_copy),
                ("SQLite", "used (executemany)", sqlite, write_records),
            ]
            if args.only_pg:
                cases = [case for case in cases if case[2] is pg]
            for database, how, engine, write in cases:
                for batch in sorted({500, args.batch}):
                    best = 0.0
                    for _ in range(args.repeat):
                        best = max(best, await throughput(engine, write, ticks, batch))
                    rows.append((database, how, batch, best))
                    if engine is pg and not size_per_tick:
                        async with pg.connect() as conn:
                            size = await conn.execute(
                                text("SELECT pg_total_relation_size('ticks')")
                            )
                            size_per_tick = int(size.scalar() or 0) / len(ticks)
            print(f"1. writer throughput, {args.ticks:,} ticks of {len(SYMBOLS)} symbols")
            print(f"{'database':<12}{'statement':<22}{'batch':>7}{'ticks/s':>12}")
            for database, how, batch, rate in rows:
                print(f"{database:<12}{how:<22}{batch:>7}{rate:>12,.0f}")
            print(f"PostgreSQL: {size_per_tick:,.0f} bytes a tick, indexes included")

            if args.only_pg:
                return
            print(f"\n2. retention: {args.deletes:,} old rows deleted in chunks of 5,000")
            for database, engine in (("PostgreSQL", pg), ("SQLite", sqlite)):
                rate = await deletes_per_second(engine, args.deletes)
                print(f"{database:<12}{rate:>12,.0f} rows/s")

            batches = f"{args.producer_batches:,} batches of 10"
            print(f"\n3. producer process, CPU µs per tick ({batches})")
            for label, engine_or_none in (
                ("no history", None),
                ("history -> SQLite", sqlite),
                ("history -> PostgreSQL", pg),
            ):
                await empty(engine_or_none or sqlite)
                cost = await producer_cost(engine_or_none, args.producer_batches)
                print(f"{label:<24}{cost:>8.1f} µs/tick")
        finally:
            await sqlite.dispose()
            await pg.dispose()
            await drop_pg()


if __name__ == "__main__":
    asyncio.run(main())
