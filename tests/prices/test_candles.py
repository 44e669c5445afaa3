"""app/prices/candles.py: the candle a run of ticks folds into, and its stored form."""

from __future__ import annotations

import random
from decimal import Decimal

import orjson

from app.prices.candles import Candle, fold_prices


def as_json(candle: Candle) -> str:
    """What a client is given for `candle`: every field, prices and volume as decimal strings."""
    return orjson.dumps(
        {
            "start": candle.start,
            "open": str(candle.open),
            "high": str(candle.high),
            "low": str(candle.low),
            "close": str(candle.close),
            "volume": str(candle.volume),
        }
    ).decode()


class TestFolding:
    def test_each_state_encodes_as_its_fields_do_through_new_highs_lows_and_minutes(
        self,
    ) -> None:
        rng = random.Random(4)
        candle, price, ts = None, Decimal("100.00"), 1_764_300_000_000
        opened, highest, lowest, traded = price, price, price, Decimal(0)
        for _ in range(5_000):
            ts += rng.choice((0, 7, 250, 9_000))  # some runs cross into the next minute
            price = max(price + Decimal(rng.randint(-30, 30)).scaleb(-2), Decimal("0.01"))
            volume = Decimal(rng.randint(1, 500)).scaleb(-rng.choice((0, 3)))
            before = candle
            candle = fold_prices(candle, 60_000, ts, price, price, price, price, volume)
            if before is None or candle.start != before.start:
                opened, highest, lowest, traded = price, price, price, volume
            else:
                highest, lowest = max(highest, price), min(lowest, price)
                traded += volume
            assert (candle.open, candle.high, candle.low, candle.close, candle.volume) == (
                opened,
                highest,
                lowest,
                price,
                traded,
            )
            assert candle.encode() == as_json(candle)
            assert Candle.decode(candle.encode()) == candle

    def test_a_run_of_several_prices_folds_its_first_last_highest_and_lowest(self) -> None:
        first = fold_prices(
            None, 60_000, 60_001, Decimal("5"), Decimal("6"), Decimal("4"), Decimal("5.5"),
            Decimal("1"),
        )  # fmt: skip
        assert first.encode() == as_json(first)
        after = fold_prices(
            first, 60_000, 60_500, Decimal("5.2"), Decimal("5.9"), Decimal("3.9"),
            Decimal("4.0"), Decimal("2"),
        )  # fmt: skip
        assert after == Candle(
            60_000, Decimal("5"), Decimal("6"), Decimal("3.9"), Decimal("4.0"), Decimal("3")
        )
        assert after.encode() == as_json(after)
        assert first.encode() == as_json(first)  # left as it was
