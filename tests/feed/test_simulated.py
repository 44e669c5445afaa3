"""app/feed/sources/simulated.py: every instrument quotes once a period, the instruments one
after another through it rather than all at one instant (on the source's own clock)."""

from __future__ import annotations

import math
import random
from decimal import ROUND_HALF_EVEN, Decimal

import pytest

from app.feed.sources import Quote
from app.feed.sources.simulated import SimulatedSource
from app.instruments.catalog import Catalog
from app.instruments.repository import InstrumentInfo
from tests.support import FakeClock


def instruments(count: int) -> Catalog:
    return Catalog(
        InstrumentInfo(f"S{i:02d}", f"symbol {i}", "equity", 2, Decimal("100.00"))
        for i in range(count)
    )


async def play(
    source: SimulatedSource, catalog: Catalog, clock: FakeClock, seconds: float
) -> list[tuple[float, list[Quote]]]:
    """The batches the source yields over `seconds` of its clock, each with when it came."""
    got: list[tuple[float, list[Quote]]] = []
    start = clock.now
    async for batch in source.stream(catalog, {}):
        got.append((clock.now - start, batch))
        if clock.now - start >= seconds:
            return got
    raise AssertionError("the stream ended")


class TestSpreadOverThePeriod:
    async def test_every_symbol_ticks_at_least_once_a_second_at_the_default_rate(self) -> None:
        clock = FakeClock()
        catalog = instruments(10)
        source = SimulatedSource(ticks_per_second=2, seed=1, clock=clock, sleep=clock.sleep)
        got = await play(source, catalog, clock, seconds=5)
        seen: dict[str, list[float]] = {}
        for at, batch in got:
            for quote in batch:
                seen.setdefault(quote.symbol, []).append(at)
        assert sorted(seen) == [i.symbol for i in catalog]
        for symbol, times in seen.items():
            gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
            assert max(gaps) <= 1.0, symbol

    async def test_a_round_comes_in_slots_not_at_one_instant(self) -> None:
        clock = FakeClock()
        catalog = instruments(50)
        source = SimulatedSource(ticks_per_second=20, seed=1, clock=clock, sleep=clock.sleep)
        got = await play(source, catalog, clock, seconds=1)
        # 50 ms a round, slots of at least 10 ms: five slots of 10 instruments, each once a
        # round.
        first_round = [quote.symbol for _at, batch in got[:5] for quote in batch]
        assert sorted(first_round) == [i.symbol for i in catalog]
        assert {len(batch) for _at, batch in got} == {10}
        assert got[1][0] - got[0][0] == pytest.approx(0.010)
        assert len(got) >= 100  # 20 rounds in the second

    async def test_a_slot_never_comes_closer_than_ten_milliseconds(self) -> None:
        clock = FakeClock()
        source = SimulatedSource(ticks_per_second=100, seed=1, clock=clock, sleep=clock.sleep)
        got = await play(source, instruments(10), clock, seconds=0.2)
        # 10 ms a round: one slot of every instrument.
        assert {len(batch) for _at, batch in got} == {10}
        # 20 ms a round: two slots of 5, 10 ms apart.
        clock = FakeClock()
        source = SimulatedSource(ticks_per_second=50, seed=1, clock=clock, sleep=clock.sleep)
        got = await play(source, instruments(10), clock, seconds=0.2)
        assert {len(batch) for _at, batch in got} == {5}
        assert got[1][0] - got[0][0] == pytest.approx(0.010)

    async def test_an_instrument_disabled_mid_round_quotes_no_more(self) -> None:
        clock = FakeClock()
        catalog = instruments(4)
        source = SimulatedSource(ticks_per_second=1, seed=1, clock=clock, sleep=clock.sleep)
        stream = source.stream(catalog, {})
        first = await anext(stream)
        catalog.replace([i for i in catalog if i.symbol != "S03"])
        rest = [quote.symbol for _ in range(5) for quote in await anext(stream)]
        assert [q.symbol for q in first] == ["S00"]
        assert "S03" not in rest
        assert rest[:2] == ["S01", "S02"]


def walked_in_decimals(
    seed: int, instrument: InstrumentInfo, quotes: int
) -> list[tuple[str, str, str, str]]:
    """The walk as it was first written, in Decimal: each price the last one times a lognormal
    step, quantized half-even to the instrument's step; half the spread the price times the
    class's spread over two, to a step; a volume of 1-500 units of the class."""
    rng = random.Random(seed)
    sigma = SimulatedSource._SIGMA[instrument.asset_class]
    spread = Decimal(SimulatedSource._SPREAD[instrument.asset_class])
    step = Decimal(10) ** -instrument.price_decimals
    last, walked = instrument.reference_price, []
    for _ in range(quotes):
        drifted = float(last) * math.exp(rng.gauss(0.0, sigma))
        price = max(Decimal(repr(drifted)).quantize(step, ROUND_HALF_EVEN), step)
        half = max((price * spread / 2).quantize(step), step)
        volume = Decimal(rng.randint(1, 500))
        if instrument.asset_class == "crypto":
            volume = (volume / 1000).quantize(Decimal("0.001"))
        elif instrument.asset_class == "fx":
            volume *= Decimal(1000)
        walked.append((str(price), str(price - half), str(price + half), str(volume)))
        last = price
    return walked


class TestTheWalk:
    @pytest.mark.parametrize(
        ("asset_class", "decimals", "start"),
        [
            ("equity", 2, "189.23"),
            ("crypto", 2, "64000.12"),
            ("fx", 5, "1.08345"),
            ("equity", 2, "0.01"),  # at the floor: never below one step
            ("crypto", 8, "0.00012345"),
            ("equity", 2, "500.004"),  # a start price finer than the instrument's step
        ],
    )
    def test_a_seeded_walk_quotes_what_the_decimal_walk_does(
        self, asset_class: str, decimals: int, start: str
    ) -> None:
        instrument = InstrumentInfo("X", "x", asset_class, decimals, Decimal(start))
        source = SimulatedSource(ticks_per_second=20, seed=11)
        last, got = instrument.reference_price, []
        for _ in range(3_000):
            quote = source.quote(instrument, last)
            assert quote.bid is not None and quote.ask is not None and quote.volume is not None
            got.append((str(quote.price), str(quote.bid), str(quote.ask), str(quote.volume)))
            last = quote.price
        assert got == walked_in_decimals(11, instrument, 3_000)

    def test_prices_keep_the_instruments_places_and_never_reach_zero(self) -> None:
        instrument = InstrumentInfo("X", "x", "crypto", 8, Decimal("0.00000002"))
        source = SimulatedSource(ticks_per_second=20, seed=2)
        last = instrument.reference_price
        for _ in range(2_000):
            quote = source.quote(instrument, last)
            assert quote.price >= Decimal("0.00000001")
            assert quote.price.as_tuple().exponent == -8
            assert quote.bid is not None and quote.ask is not None
            assert quote.ask - quote.price == quote.price - quote.bid >= Decimal("0.00000001")
            last = quote.price

    def test_a_price_set_from_outside_is_walked_from(self) -> None:
        instrument = InstrumentInfo("X", "x", "equity", 2, Decimal("100.00"))
        source = SimulatedSource(ticks_per_second=20, seed=3)
        source.quote(instrument, Decimal("100.00"))
        # Not the price it drew last: a restart's start price, say. One step of 0.04% sigma
        # stays within a few percent of it.
        quote = source.quote(instrument, Decimal("2000.00"))
        assert Decimal("1900") < quote.price < Decimal("2100")
