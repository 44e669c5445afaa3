"""OHLCV candles, built by the producer tick by tick (it is the single writer)."""

from __future__ import annotations

from dataclasses import dataclass, field
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
    # The encoded form's start, open, high and low (`encode`), or None until asked for. A
    # candle folded from this one keeps it while its high and low stay: they change far less
    # often than the close and the volume, which are all a tick usually changes.
    encoded_head: str | None = field(default=None, compare=False, repr=False)

    def encode(self) -> str:
        # What orjson.dumps of the same object writes (str() of a Decimal needs no escaping),
        # at a tenth of its cost: the store takes every interval's candle with every run.
        # (`!s`: str() is what an f-string's format() of a Decimal gives, at half the cost.)
        head = self.encoded_head
        if head is None:
            head = self.encoded_head = (
                f'{{"start":{self.start},"open":"{self.open!s}","high":"{self.high!s}",'
                f'"low":"{self.low!s}",'
            )
        return f'{head}"close":"{self.close!s}","volume":"{self.volume!s}"}}'

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
    kept_high, kept_low = current.high, current.low
    if high > kept_high or low < kept_low:
        return Candle(
            start,
            current.open,
            high if high > kept_high else kept_high,
            low if low < kept_low else kept_low,
            close,
            current.volume + volume,
        )
    # The same start, open, high and low: the same encoded head.
    return Candle(
        start,
        current.open,
        kept_high,
        kept_low,
        close,
        current.volume + volume,
        current.encoded_head,
    )
