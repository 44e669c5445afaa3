"""Seq high-water marks in the database: the producer's memory that outlives Redis.

The producer writes each symbol's latest seq every few seconds. A new leader resumes from the
seq of record (the store, or what it saw published: app/feed/producer.py `_resume`); the
database's history is evidence too. A checkpoint adds what neither has: ticks published while
the history writer was behind. One ahead of every proof means ticks after it may have gone out
unrecorded, so `seq` resumes past it by a margin: a jump clients see, never a seq used twice.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import BigInteger, DateTime, String, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base


class TickSequence(Base):
    __tablename__ = "tick_sequences"

    symbol: Mapped[str] = mapped_column(String(16), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class SeqCheckpoints:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def read(self) -> dict[str, int]:
        async with self._sessions() as session:
            rows = await session.scalars(select(TickSequence))
            return {row.symbol: row.seq for row in rows}

    async def write(self, seqs: dict[str, int]) -> None:
        now = datetime.now(UTC)
        async with self._sessions() as session:
            stored = {r.symbol: r for r in await session.scalars(select(TickSequence))}
            for symbol, seq in seqs.items():
                row = stored.get(symbol)
                if row is None:
                    session.add(TickSequence(symbol=symbol, seq=seq, updated_at=now))
                elif seq > row.seq:
                    row.seq, row.updated_at = seq, now
            await session.commit()
