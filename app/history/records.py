"""The history tables' write side, in SQL: ticks inserted once, candles upserted, rows past
`HISTORY_DAYS` deleted in chunks; and what a new leader resumes from when Redis lost it (each
symbol's newest seq, its newest candles).

Idempotent by key on SQLite and PostgreSQL alike (`INSERT … ON CONFLICT`): a retried batch, or
a new leader re-writing the retention window it finds in the store, changes nothing. On
PostgreSQL a batch of ticks is one `INSERT … SELECT FROM unnest(…)` statement (four arrays,
one round trip, one plan), or from 1,000 ticks on, COPY into a staging table and one
`INSERT … SELECT`: whichever bench/history.py measured faster at that size (executemany was
slower than both); its candles are one upsert from a JSON array. On SQLite each table is one
`executemany` straight to the driver.

A tick is its row already (`Tick` is the tuple `(symbol, seq, ts, frame)`, the columns' order),
so no row is built for it; a batch goes in sorted by symbol (stable: each symbol's ticks stay
in seq order), so consecutive rows land on the same index pages.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from operator import itemgetter
from typing import Any

import orjson
from sqlalchemy import TextClause, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.prices.candles import Candle
from app.prices.ticks import Tick

# (symbol, interval, start) -> (open, high, low, close, volume): a candle's state when offered
CandleKey = tuple[str, str, int]
CandleValues = tuple[Decimal, Decimal, Decimal, Decimal, Decimal]

# PostgreSQL: a batch this large goes by COPY (~70,000 ticks/s on the test machine against
# ~50,000 for unnest at 5,000 a batch); a smaller one by unnest, faster there (bench/history.py).
COPY_FROM_TICKS = 1000
_STAGE = text(
    "CREATE TEMP TABLE IF NOT EXISTS ticks_stage (LIKE ticks INCLUDING DEFAULTS)"
    " ON COMMIT DELETE ROWS"
)
_FROM_STAGE = text("INSERT INTO ticks SELECT * FROM ticks_stage ON CONFLICT DO NOTHING")
_TICKS_FROM_ARRAYS = text(
    "INSERT INTO ticks (symbol, seq, ts, frame) "
    "SELECT * FROM unnest(CAST(:symbols AS varchar[]), CAST(:seqs AS bigint[]), "
    "CAST(:ts AS bigint[]), CAST(:frames AS text[])) "
    "ON CONFLICT DO NOTHING"
)
_TICKS_SQLITE = (
    "INSERT INTO ticks (symbol, seq, ts, frame) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING"
)
# "interval" quoted: a keyword in PostgreSQL's grammar (and kept so here, for one spelling).
_CANDLES_SQLITE = (
    'INSERT INTO candles (symbol, "interval", start, open, high, low, close, volume)'
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    ' ON CONFLICT (symbol, "interval", start) DO UPDATE SET open = excluded.open,'
    " high = excluded.high, low = excluded.low, close = excluded.close,"
    " volume = excluded.volume"
)
# The same upsert from one JSON array: one statement and one round trip for every candle of a
# flush. Cheapest on the event loop of those measured for 400 candles: ~2 µs a candle against
# ~4.5 for the driver's executemany, ~5.5 for unnest arrays (asyncpg checks each text element
# of an array against abstract base classes) and ~10 for SQLAlchemy's executemany.
_CANDLES_FROM_JSON = text(
    'INSERT INTO candles (symbol, "interval", start, open, high, low, close, volume) '
    "SELECT r.s, r.i, r.t, r.o, r.h, r.l, r.c, r.v FROM json_to_recordset(CAST(:rows AS json))"
    " AS r(s varchar, i varchar, t bigint, o varchar, h varchar, l varchar, c varchar, v varchar)"
    ' ON CONFLICT (symbol, "interval", start) DO UPDATE SET open = excluded.open,'
    " high = excluded.high, low = excluded.low, close = excluded.close,"
    " volume = excluded.volume"
)
_BY_SYMBOL = itemgetter(0)
# Every symbol with rows, without reading them all: one index probe per symbol (a loose index
# scan; neither SQLite nor PostgreSQL does one for SELECT DISTINCT by itself).
_SYMBOLS_WITH_TICKS = text(
    "WITH RECURSIVE s(symbol) AS ("
    " SELECT min(symbol) FROM ticks"
    " UNION ALL"
    " SELECT (SELECT min(symbol) FROM ticks WHERE symbol > s.symbol) FROM s"
    " WHERE s.symbol IS NOT NULL"
    ") SELECT symbol FROM s WHERE symbol IS NOT NULL"
)
_DELETE_OLD_TICKS = text(
    "DELETE FROM ticks WHERE symbol = :symbol AND seq IN ("
    " SELECT seq FROM ticks WHERE symbol = :symbol AND ts < :cutoff ORDER BY ts LIMIT :rows)"
)
# "interval" quoted: a keyword in PostgreSQL's grammar.
_DELETE_OLD_CANDLES = text(
    'DELETE FROM candles WHERE symbol = :symbol AND "interval" = :interval AND start IN ('
    ' SELECT start FROM candles WHERE symbol = :symbol AND "interval" = :interval'
    " AND start < :cutoff LIMIT :rows)"
)
_NEWEST_TICK = text(
    "SELECT symbol, seq, ts, frame FROM ticks WHERE symbol = :symbol ORDER BY seq DESC LIMIT 1"
)
_NEWEST_CANDLE = text(
    "SELECT start, open, high, low, close, volume FROM candles"
    ' WHERE symbol = :symbol AND "interval" = :interval ORDER BY start DESC LIMIT 1'
)


class HistoryRecords:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self.postgres = engine.dialect.name == "postgresql"

    async def write(self, ticks: Sequence[Tick], candles: Mapping[CandleKey, CandleValues]) -> None:
        """Keep `ticks` (those kept already stay as they are) and the candles' states (each
        replaces what its key held), in one transaction."""
        async with self._engine.begin() as conn:
            if ticks:
                await self._insert_ticks(conn, sorted(ticks, key=_BY_SYMBOL))
            if candles:
                await self._upsert_candles(conn, candles)

    async def _insert_ticks(self, conn: AsyncConnection, ticks: list[Tick]) -> None:
        if self.postgres and len(ticks) >= COPY_FROM_TICKS:
            # COPY cannot skip conflicts itself: into a staging table of this connection's,
            # emptied at commit, then INSERT … SELECT … ON CONFLICT DO NOTHING.
            await conn.execute(_STAGE)
            raw = await conn.get_raw_connection()
            driver: Any = raw.driver_connection  # asyncpg's, in this transaction
            await driver.copy_records_to_table(
                "ticks_stage",
                records=ticks,
                columns=["symbol", "seq", "ts", "frame"],
            )
            await conn.execute(_FROM_STAGE)
            return
        if self.postgres:
            await conn.execute(
                _TICKS_FROM_ARRAYS,
                {
                    "symbols": [t.symbol for t in ticks],
                    "seqs": [t.seq for t in ticks],
                    "ts": [t.ts for t in ticks],
                    "frames": [t.frame for t in ticks],
                },
            )
            return
        # Straight to the driver's executemany: SQLAlchemy's per-row parameter handling
        # would cost the producer's event loop ~5 µs a tick.
        await conn.exec_driver_sql(_TICKS_SQLITE, ticks)

    async def _upsert_candles(
        self, conn: AsyncConnection, candles: Mapping[CandleKey, CandleValues]
    ) -> None:
        if not self.postgres:
            # As the ticks: straight to the driver. Through SQLAlchemy, building the upsert and
            # handling each row's parameters cost the producer's event loop ~10 µs a candle,
            # every interval's of every symbol at each flush.
            await conn.exec_driver_sql(
                _CANDLES_SQLITE,
                [
                    (symbol, interval, start, *(str(value) for value in values))
                    for (symbol, interval, start), values in candles.items()
                ],
            )
            return
        rows = [
            {
                "s": symbol,
                "i": interval,
                "t": start,
                "o": str(values[0]),
                "h": str(values[1]),
                "l": str(values[2]),
                "c": str(values[3]),
                "v": str(values[4]),
            }
            for (symbol, interval, start), values in candles.items()
        ]
        await conn.execute(_CANDLES_FROM_JSON, {"rows": orjson.dumps(rows).decode()})

    async def read_newest_ticks(self, symbols: Iterable[str]) -> dict[str, Tick]:
        """Each symbol's newest tick kept (symbols with none are left out): one index probe
        each."""
        found: dict[str, Tick] = {}
        async with self._engine.connect() as conn:
            for symbol in symbols:
                row = (await conn.execute(_NEWEST_TICK, {"symbol": symbol})).first()
                if row is not None:
                    found[symbol] = Tick(row[0], int(row[1]), int(row[2]), row[3])
        return found

    async def read_newest_candles(
        self, keys: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], Candle]:
        """The newest candle kept of each (symbol, interval), the one a restart finds forming."""
        found: dict[tuple[str, str], Candle] = {}
        async with self._engine.connect() as conn:
            for symbol, interval in keys:
                row = (
                    await conn.execute(_NEWEST_CANDLE, {"symbol": symbol, "interval": interval})
                ).first()
                if row is not None:
                    found[(symbol, interval)] = Candle(
                        start=int(row[0]),
                        open=Decimal(row[1]),
                        high=Decimal(row[2]),
                        low=Decimal(row[3]),
                        close=Decimal(row[4]),
                        volume=Decimal(row[5]),
                    )
        return found

    async def delete_older_than(
        self, cutoff_ms: int, *, intervals: Iterable[str], chunk: int
    ) -> int:
        """Delete ticks with `ts` and candles with `start` before `cutoff_ms`, at most `chunk`
        rows per transaction (short locks, a bounded WAL/journal per step). The rows deleted."""
        deleted = 0
        # One connection for the whole pass, committed after each step that deleted rows: most
        # steps delete nothing (a purge every minute finds a minute's rows at most), and a
        # transaction of its own per step was 5 a symbol, each a commit and thread hops on
        # SQLite (a tenth of the producer's CPU in a 10-second window with 50 symbols).
        async with self._engine.connect() as conn:
            symbols = [row[0] for row in await conn.execute(_SYMBOLS_WITH_TICKS)]
            for symbol in symbols:
                steps: list[tuple[TextClause, dict[str, str]]] = [(_DELETE_OLD_TICKS, {})] + [
                    (_DELETE_OLD_CANDLES, {"interval": i}) for i in intervals
                ]
                for statement, extra in steps:
                    while True:
                        result = await conn.execute(
                            statement,
                            {"symbol": symbol, "cutoff": cutoff_ms, "rows": chunk, **extra},
                        )
                        count = max(result.rowcount or 0, 0)
                        deleted += count
                        if count:
                            await conn.commit()  # at most `chunk` rows a transaction
                        if count < chunk:
                            break
            await conn.commit()
        return deleted
