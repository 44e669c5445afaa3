"""Reading history back from the database: the queries, and nothing that knows of Redis.

Each read is one indexed query: ticks by `(symbol, seq)` (the primary key) or `(symbol, ts)`
(`ix_ticks_symbol_ts`), candles by `(symbol, interval, start)` (the primary key). A tick comes
back as it was published: its stored frame is the frame subscribers got.

Range reads page on `(ts, seq)`, not on `ts` alone: ticks may share a millisecond, and a cursor
on `ts` would skip or repeat them at a page boundary. `(ts, seq)` is unique per symbol.
"""

from __future__ import annotations

from decimal import Decimal

from sqlalchemy import and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.history.models import CandleRecord, TickRecord
from app.prices.candles import Candle
from app.prices.ticks import Tick

Sessions = async_sessionmaker[AsyncSession]


def _tick(row: TickRecord) -> Tick:
    return Tick(symbol=row.symbol, seq=row.seq, ts=row.ts, frame=row.frame)


async def read_ticks_after(
    sessions: Sessions, *, symbol: str, since: int, limit: int, below: int | None = None
) -> list[Tick]:
    """The stored ticks with `since < seq` (and `seq < below`), oldest first, at most `limit`."""
    query = select(TickRecord).where(TickRecord.symbol == symbol, TickRecord.seq > since)
    if below is not None:
        query = query.where(TickRecord.seq < below)
    async with sessions() as session:
        rows = await session.scalars(query.order_by(TickRecord.seq).limit(limit))
        return [_tick(row) for row in rows]


async def read_ticks_before(
    sessions: Sessions, *, symbol: str, below: int | None, limit: int
) -> list[Tick]:
    """The newest `limit` stored ticks with `seq < below` (all if None), oldest first."""
    query = select(TickRecord).where(TickRecord.symbol == symbol)
    if below is not None:
        query = query.where(TickRecord.seq < below)
    async with sessions() as session:
        rows = await session.scalars(query.order_by(TickRecord.seq.desc()).limit(limit))
        return [_tick(row) for row in reversed(list(rows))]


async def read_ticks_between(
    sessions: Sessions,
    *,
    symbol: str,
    start: int,
    end: int,
    after: tuple[int, int] | None,
    limit: int,
) -> list[Tick]:
    """The stored ticks with `start <= ts < end` and `(ts, seq) > after`, in `(ts, seq)` order,
    at most `limit`."""
    query = select(TickRecord).where(
        TickRecord.symbol == symbol, TickRecord.ts >= start, TickRecord.ts < end
    )
    if after is not None:
        ts, seq = after
        # Spelled out rather than as a row value: `ts >= :ts` is what the index ranges on.
        query = query.where(
            TickRecord.ts >= ts,
            or_(TickRecord.ts > ts, and_(TickRecord.ts == ts, TickRecord.seq > seq)),
        )
    query = query.order_by(TickRecord.ts, TickRecord.seq).limit(limit)
    async with sessions() as session:
        return [_tick(row) for row in await session.scalars(query)]


async def read_newest_seq(sessions: Sessions, *, symbol: str) -> int | None:
    """The highest seq stored for `symbol` (None: none): where the writer has got to."""
    async with sessions() as session:
        newest: int | None = await session.scalar(
            select(func.max(TickRecord.seq)).where(TickRecord.symbol == symbol)
        )
        return newest


def _candle(row: CandleRecord) -> Candle:
    return Candle(
        start=row.start,
        open=Decimal(row.open),
        high=Decimal(row.high),
        low=Decimal(row.low),
        close=Decimal(row.close),
        volume=Decimal(row.volume),
    )


async def read_candles(
    sessions: Sessions,
    *,
    symbol: str,
    interval: str,
    start: int | None,
    end: int | None,
    limit: int,
) -> list[Candle]:
    """Stored candles of `interval` whose start is in `[start, end)`, oldest first: the first
    `limit` from `start`, or, without `start`, the newest `limit` before `end`."""
    query = select(CandleRecord).where(
        CandleRecord.symbol == symbol, CandleRecord.interval == interval
    )
    if start is not None:
        query = query.where(CandleRecord.start >= start)
    if end is not None:
        query = query.where(CandleRecord.start < end)
    newest_first = start is None
    order = CandleRecord.start.desc() if newest_first else CandleRecord.start
    async with sessions() as session:
        rows = list(await session.scalars(query.order_by(order).limit(limit)))
    if newest_first:
        rows.reverse()
    return [_candle(row) for row in rows]


async def read_newest_candle_start(sessions: Sessions, *, symbol: str, interval: str) -> int | None:
    """The start of the newest stored candle of `interval` (None: none)."""
    async with sessions() as session:
        newest: int | None = await session.scalar(
            select(func.max(CandleRecord.start)).where(
                CandleRecord.symbol == symbol, CandleRecord.interval == interval
            )
        )
        return newest
