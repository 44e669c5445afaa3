"""app/feed/sources/simulated.py: every instrument quotes once a period, the instruments one
after another through it rather than all at one instant (on the source's own clock)."""

from __future__ import annotations

from decimal import Decimal

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
