"""`python -m app.admin add-instrument` and `disable-instrument`: what they write, the one line
they print, and a clear refusal, with a non-zero exit, for every bad input."""

from __future__ import annotations

from decimal import Decimal

import pytest

from app.db import create_engine, create_session_factory
from app.instruments.models import Instrument
from tests.instruments.admin_support import admin_ok, run_admin

XRP = ["--symbol", "xrp-usd", "--name", "XRP / US Dollar", "--asset-class", "crypto"]


async def stored(database_url: str, symbol: str) -> Instrument | None:
    engine = create_engine(database_url)
    try:
        async with create_session_factory(engine)() as session:
            return await session.get(Instrument, symbol)
    finally:
        await engine.dispose()


class TestAddInstrument:
    async def test_it_creates_then_updates_then_re_activates(self, database_url: str) -> None:
        line = admin_ok(database_url, "add-instrument", *XRP, "--decimals", "4")
        assert line == (
            "added XRP-USD (XRP / US Dollar, crypto, 4 decimals, reference price 1.0000)"
        )
        row = await stored(database_url, "XRP-USD")
        assert row is not None and row.active and row.price_decimals == 4
        assert row.reference_price == Decimal(1)

        line = admin_ok(
            database_url, "add-instrument", *XRP, "--decimals", "4", "--reference-price", "0.51"
        )
        assert line == "updated XRP-USD: reference price 1.0000 -> 0.5100"
        assert admin_ok(database_url, "add-instrument", *XRP, "--decimals", "4") == (
            "updated XRP-USD: unchanged"  # the reference price it has is kept
        )

        assert admin_ok(database_url, "disable-instrument", "--symbol", "XRP-USD") == (
            "disabled XRP-USD"
        )
        row = await stored(database_url, "XRP-USD")
        assert row is not None and not row.active
        line = admin_ok(database_url, "add-instrument", *XRP, "--decimals", "5")
        assert line == "updated XRP-USD: re-activated, decimals 4 -> 5"
        row = await stored(database_url, "XRP-USD")
        assert row is not None and row.active and row.reference_price == Decimal("0.51")

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            (
                ["--symbol", "BAD SYMBOL", "--decimals", "4"],
                "argument --symbol: not a symbol: 'BAD SYMBOL'",
            ),
            (["--symbol", "-X", "--decimals", "4"], "argument --symbol: expected one argument"),
            (
                ["--symbol", "A" * 17, "--decimals", "4"],
                f"argument --symbol: not a symbol: '{'A' * 17}'",
            ),
            (
                ["--symbol", "OK", "--decimals", "9"],
                "argument --decimals: decimals is a whole number from 0 to 8, not '9'",
            ),
            (
                ["--symbol", "OK", "--decimals", "-1"],
                "argument --decimals: decimals is a whole number from 0 to 8, not '-1'",
            ),
            (
                ["--symbol", "OK", "--decimals", "two"],
                "argument --decimals: decimals is a whole number from 0 to 8, not 'two'",
            ),
            (
                ["--symbol", "OK", "--decimals", "2", "--reference-price", "1.234"],
                "argument --reference-price: reference price '1.234' has more than 2 decimals",
            ),
            (
                ["--symbol", "OK", "--decimals", "2", "--reference-price", "0"],
                "argument --reference-price: reference price must be greater than zero",
            ),
            (
                ["--symbol", "OK", "--decimals", "2", "--reference-price", "1e3"],
                "argument --reference-price: reference price must be a positive decimal string",
            ),
        ],
        ids=[
            "space",
            "leading-dash",
            "too-long",
            "decimals-9",
            "decimals-negative",
            "decimals-word",
            "price-too-precise",
            "price-zero",
            "price-exponent",
        ],
    )
    def test_a_bad_value_is_refused_and_nothing_written(
        self, database_url: str, args: list[str], message: str
    ) -> None:
        done = run_admin(
            database_url, "add-instrument", "--name", "Test", "--asset-class", "fx", *args
        )
        assert done.returncode == 2
        assert message in done.stderr
        assert "Traceback" not in done.stderr
        assert done.stdout == ""

    def test_an_unknown_asset_class_is_refused(self, database_url: str) -> None:
        done = run_admin(database_url, "add-instrument", *XRP[:4], "--asset-class", "bond")
        assert done.returncode == 2
        assert "argument --asset-class: invalid choice: 'bond'" in done.stderr


class TestDisableInstrument:
    def test_an_unknown_symbol_is_refused(self, database_url: str) -> None:
        done = run_admin(database_url, "disable-instrument", "--symbol", "NOPE-USD")
        assert done.returncode == 1
        assert done.stderr.strip() == "error: no instrument NOPE-USD; nothing disabled"

    def test_disabling_twice_says_so(self, database_url: str) -> None:
        assert admin_ok(database_url, "disable-instrument", "--symbol", "aapl") == "disabled AAPL"
        assert admin_ok(database_url, "disable-instrument", "--symbol", "AAPL") == (
            "AAPL was disabled already"
        )

    def test_a_database_without_the_schema_is_a_clear_error(self, tmp_path) -> None:
        done = run_admin(
            f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}", "disable-instrument", "--symbol", "X"
        )
        assert done.returncode == 1
        assert done.stderr.startswith("error: cannot use the database (")
        assert "has `alembic upgrade head` run?" in done.stderr
        assert "Traceback" not in done.stderr
