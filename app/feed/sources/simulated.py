"""FEED_SOURCE=simulated: a geometric random walk per instrument (the default, for a bare
machine, demos and tests)."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import AsyncIterator
from decimal import ROUND_HALF_EVEN, Decimal
from typing import TYPE_CHECKING

from app.feed.sources import Instruments, Quote
from app.instruments.repository import InstrumentInfo

if TYPE_CHECKING:
    from app.config import Settings
    from app.feed.stats import FeedStats


def create(settings: Settings, stats: FeedStats) -> SimulatedSource:
    return SimulatedSource(ticks_per_second=settings.feed_ticks_per_second, seed=settings.feed_seed)


class SimulatedSource:
    """A geometric random walk per instrument, at the instrument's price precision.

    Every instrument quotes `ticks_per_second` times a second. With a seed, the walk is the
    same on every run (for tests). An instrument added while it runs starts at its reference
    price on the next round."""

    name = "simulated"

    # Per-tick volatility by asset class: roughly what a second of trading looks like.
    _SIGMA = {"equity": 0.0004, "crypto": 0.0008, "fx": 0.00005}
    _SPREAD = {"equity": 0.0001, "crypto": 0.0002, "fx": 0.00002}

    def __init__(self, *, ticks_per_second: float, seed: int | None = None) -> None:
        self._interval = 1.0 / ticks_per_second
        self._random = random.Random(seed)

    def quote(self, instrument: InstrumentInfo, last: Decimal) -> Quote:
        step = Decimal(10) ** -instrument.price_decimals
        sigma = self._SIGMA.get(instrument.asset_class, 0.0004)
        drifted = float(last) * math.exp(self._random.gauss(0.0, sigma))
        price = max(Decimal(repr(drifted)).quantize(step, ROUND_HALF_EVEN), step)
        half_spread = max(
            (price * Decimal(self._SPREAD.get(instrument.asset_class, 0.0001)) / 2).quantize(step),
            step,
        )
        volume = Decimal(self._random.randint(1, 500))
        if instrument.asset_class == "crypto":
            volume = (volume / 1000).quantize(Decimal("0.001"))
        elif instrument.asset_class == "fx":
            volume *= 1000
        return Quote(
            symbol=instrument.symbol,
            price=price,
            bid=price - half_spread,
            ask=price + half_spread,
            volume=volume,
        )

    async def stream(
        self, instruments: Instruments, start_prices: dict[str, Decimal]
    ) -> AsyncIterator[list[Quote]]:
        last = dict(start_prices)
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            batch = [self.quote(i, last.get(i.symbol, i.reference_price)) for i in instruments]
            for quote in batch:
                last[quote.symbol] = quote.price
            yield batch
            next_at += self._interval
            delay = next_at - loop.time()
            if delay < -self._interval:  # fell far behind (a stall): don't burst to catch up
                next_at = loop.time()
                delay = 0
            await asyncio.sleep(max(delay, 0))
