"""The history tables: ticks as they were published, and candles as they were folded.

A tick is kept as the frame subscribers got (its JSON, `"type": "tick"`), so what a history
read returns is byte for byte what the stream sent, optional fields included; `(symbol, seq)`
is its identity, so writing a tick twice (a retry, a new leader re-writing the retention
window) changes nothing. `(symbol, ts)` serves time-range reads.

Candle prices and volume are decimal strings, as the API gives them: exact on SQLite too,
where a NUMERIC column would round through a float.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base


class TickRecord(Base):
    __tablename__ = "ticks"

    symbol: Mapped[str] = mapped_column(String(16), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    ts: Mapped[int] = mapped_column(BigInteger)  # epoch ms, as stamped by the producer
    frame: Mapped[str] = mapped_column(Text)  # the tick's JSON, as published

    __table_args__ = (Index("ix_ticks_symbol_ts", "symbol", "ts"),)


class CandleRecord(Base):
    __tablename__ = "candles"

    symbol: Mapped[str] = mapped_column(String(16), primary_key=True)
    interval: Mapped[str] = mapped_column(String(4), primary_key=True)  # 1m | 5m | 1h | 1d
    start: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # epoch ms
    open: Mapped[str] = mapped_column(String(40))
    high: Mapped[str] = mapped_column(String(40))
    low: Mapped[str] = mapped_column(String(40))
    close: Mapped[str] = mapped_column(String(40))
    volume: Mapped[str] = mapped_column(String(40))
