"""FEED_SOURCE=simulated: a geometric random walk per instrument (the default, for a bare
machine, demos and tests)."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import TYPE_CHECKING

from app.feed.sources import Instruments, Quote
from app.instruments.repository import InstrumentInfo

if TYPE_CHECKING:
    from app.config import Settings
    from app.feed.stats import FeedStats


# The shortest gap between two slots of a round. A slot is one producer batch, and every
# tick of it reaches its subscribers only once the fan-out has sent the whole slot: at S1
# (50 symbols x 20/s, 20 subscribers each) 20 ms slots were 25 ticks, 500 sends, about
# 3.5 ms for the last of them, which with the producer's stamp -> store -> publish put p99
# near 10 ms. 10 ms slots (five of 10) halve that span; each slot costs the producer a batch
# (0.2-0.3 ms of CPU once batches are cheap, ~1 ms before: docs/performance.md, issue 13).
SLOT_SECONDS = 0.01
# (price decimals, sigma, spread as an exact ratio of integers, asset class)
_Terms = tuple[int, float, tuple[int, int], str]


def create(settings: Settings, stats: FeedStats) -> SimulatedSource:
    return SimulatedSource(ticks_per_second=settings.feed_ticks_per_second, seed=settings.feed_seed)


class SimulatedSource:
    """A geometric random walk per instrument, at the instrument's price precision.

    Every instrument quotes `ticks_per_second` times a second, the instruments one after
    another through each period (`stream`). With a seed, the walk is the
    same on every run (for tests). An instrument added while it runs starts at its reference
    price on the next round."""

    name = "simulated"

    # Per-tick volatility by asset class: roughly what a second of trading looks like.
    _SIGMA = {"equity": 0.0004, "crypto": 0.0008, "fx": 0.00005}
    _SPREAD = {"equity": 0.0001, "crypto": 0.0002, "fx": 0.00002}

    def __init__(
        self,
        *,
        ticks_per_second: float,
        seed: int | None = None,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """`clock` (default: the event loop's) and `sleep` are what the pacing waits on."""
        self._interval = 1.0 / ticks_per_second
        self._random = random.Random(seed)
        self._clock = clock
        self._sleep = sleep
        self._terms_by_kind: dict[tuple[int, str], _Terms] = {}
        # Per symbol, the last price drawn and the same in price steps: the walk's own state,
        # used while the price it is asked to go on from is that one.
        self._walked: dict[str, tuple[Decimal, int]] = {}

    def quote(self, instrument: InstrumentInfo, last: Decimal) -> Quote:
        decimals, sigma, spread, volume_kind = self._terms(instrument)
        # The walk goes on in whole price steps (integers): a Decimal is built once for the
        # price and once for the half spread, not quantized out of a float's repr each tick.
        walked = self._walked.get(instrument.symbol)
        if walked is not None and walked[0] is last:
            units: float = walked[1]
        else:  # a start price, or one given from outside the walk: maybe finer than a step
            units = float(last.scaleb(decimals))
        steps = max(round(units * math.exp(self._random.gauss(0.0, sigma))), 1)
        # Half the spread, rounded half-even to a step (at least one): exactly what
        # `(price * spread / 2).quantize(step)` gives, in integers (spread = num / den).
        num, den = spread
        half, rest = divmod(steps * num, 2 * den)
        if rest > den or (rest == den and half & 1):
            half += 1
        price = Decimal(steps).scaleb(-decimals)
        half_spread = Decimal(max(half, 1)).scaleb(-decimals)
        self._walked[instrument.symbol] = (price, steps)
        drawn = self._random.randrange(1, 501)
        if volume_kind == "crypto":  # fractions of a coin, to 3 places
            volume = Decimal(drawn).scaleb(-3)
        elif volume_kind == "fx":  # lots of a thousand
            volume = Decimal(drawn * 1000)
        else:
            volume = Decimal(drawn)
        return Quote(
            symbol=instrument.symbol,
            price=price,
            bid=price - half_spread,
            ask=price + half_spread,
            volume=volume,
        )

    def _terms(self, instrument: InstrumentInfo) -> _Terms:
        """The walk's constants for `instrument`'s precision and class, built once each: a
        quote is drawn per tick, and building them was a third of its cost."""
        key = (instrument.price_decimals, instrument.asset_class)
        terms = self._terms_by_kind.get(key)
        if terms is None:
            asset_class = instrument.asset_class
            terms = self._terms_by_kind[key] = (
                instrument.price_decimals,
                self._SIGMA.get(asset_class, 0.0004),
                self._SPREAD.get(asset_class, 0.0001).as_integer_ratio(),
                asset_class,
            )
        return terms

    async def stream(
        self, instruments: Instruments, start_prices: dict[str, Decimal]
    ) -> AsyncIterator[list[Quote]]:
        """A round of every instrument each period (1 / ticks_per_second), spread over it in
        slots of at least SLOT_SECONDS: an exchange's ticks come one after another, not all
        at one instant, and a round sent at once made each tick wait behind the whole round
        on its way to subscribers. A slot's quotes are drawn when it is due."""
        last = dict(start_prices)
        clock = self._clock or asyncio.get_running_loop().time
        next_at = clock()
        while True:
            round_ = list(instruments)
            slots = max(1, min(len(round_), int(self._interval / SLOT_SECONDS)))
            for slot in range(slots):
                part = round_[slot * len(round_) // slots : (slot + 1) * len(round_) // slots]
                batch = [
                    self.quote(i, last.get(i.symbol, i.reference_price))
                    for i in part
                    if i.symbol in instruments  # not disabled since the round began
                ]
                for quote in batch:
                    last[quote.symbol] = quote.price
                if batch:
                    yield batch
                next_at += self._interval / slots
                delay = next_at - clock()
                if delay < -self._interval:  # fell far behind (a stall): don't burst to catch up
                    next_at = clock()
                    delay = 0
                await self._sleep(max(delay, 0))
