"""OHLCV candles, built by the producer tick by tick (it is the single writer)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import orjson

INTERVALS_MS: dict[str, int] = {
    "1m": 60_000,
    "5m": 300_000,
    "1h": 3_600_000,
    "1d": 86_400_000,
}


@dataclass(slots=True)
class Candle:
    start: int
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal

    def encode(self) -> str:
        # What orjson.dumps of the same object writes (str() of a Decimal needs no escaping),
        # at a third of its cost: the store takes every interval's candle with every run.
        return (
            f'{{"start":{self.start},"open":"{self.open}","high":"{self.high}",'
            f'"low":"{self.low}","close":"{self.close}","volume":"{self.volume}"}}'
        )

    @classmethod
    def decode(cls, text: str) -> Candle:
        body = orjson.loads(text)
        return cls(
            start=int(body["start"]),
            open=Decimal(body["open"]),
            high=Decimal(body["high"]),
            low=Decimal(body["low"]),
            close=Decimal(body["close"]),
            volume=Decimal(body["volume"]),
        )


def fold_prices(
    current: Candle | None,
    interval_ms: int,
    ts: int,
    open: Decimal,
    high: Decimal,
    low: Decimal,
    close: Decimal,
    volume: Decimal,
) -> Candle:
    """The candle of `interval_ms` that contains `ts`, after ticks stamped `ts` with these
    prices (the first `open`, the last `close`) and traded `volume` in all. A new object:
    `current` is left as it was, so a batch that is never stored leaves no trace. (Positional
    arguments: the producer calls it for every interval of every run it stamps.)"""
    start = ts - ts % interval_ms
    if current is None:
        return Candle(start, open, high, low, close, volume)
    if start < current.start:
        start = current.start  # a clock step back (say, on failover) must not rewrite history
    if current.start != start:
        return Candle(start, open, high, low, close, volume)
    return Candle(
        start,
        current.open,
        high if high > current.high else current.high,
        low if low < current.low else current.low,
        close,
        current.volume + volume,
    )
