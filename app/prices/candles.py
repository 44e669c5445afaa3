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
        return orjson.dumps(
            {
                "start": self.start,
                "open": str(self.open),
                "high": str(self.high),
                "low": str(self.low),
                "close": str(self.close),
                "volume": str(self.volume),
            }
        ).decode()

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


def fold_tick(
    current: Candle | None, *, interval_ms: int, ts: int, price: Decimal, volume: Decimal
) -> Candle:
    """The candle of `interval_ms` that contains `ts`, after this tick."""
    start = ts - ts % interval_ms
    if current is not None and start < current.start:
        start = current.start  # a clock step back (say, on failover) must not rewrite history
    if current is None or current.start != start:
        return Candle(start=start, open=price, high=price, low=price, close=price, volume=volume)
    current.high = max(current.high, price)
    current.low = min(current.low, price)
    current.close = price
    current.volume += volume
    return current
