"""app/feed/quotes.py: what every source (pushed, replayed, upstream) accepts as a price."""

from __future__ import annotations

from decimal import Decimal

import pytest

from app.feed.quotes import QuoteError, parse_amount, parse_price, parse_side


@pytest.mark.parametrize(
    ("raw", "decimals", "expected"),
    [
        ("189.23", 2, Decimal("189.23")),
        ("189.2", 2, Decimal("189.20")),  # given the instrument's places
        ("189.2300", 2, Decimal("189.23")),  # trailing zeros do not count
        ("67250", 2, Decimal("67250.00")),
        (" 0.0001 ", 4, Decimal("0.0001")),
    ],
)
def test_good_prices(raw: str, decimals: int, expected: Decimal) -> None:
    price = parse_price(raw, decimals)
    assert price == expected
    assert str(price) == str(expected)  # and written with exactly the instrument's places


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("abc", "bad_price"),
        ("-1", "bad_price"),
        ("0", "bad_price"),
        ("0.00", "bad_price"),
        ("1e9999", "bad_price"),
        ("1E5", "bad_price"),
        ("NaN", "bad_price"),
        ("Infinity", "bad_price"),
        ("", "bad_price"),
        ("1.2.3", "bad_price"),
        ("+5", "bad_price"),
        ("1" * 17, "bad_price"),  # out of any market's range
        (189.23, "bad_price"),  # a float has already lost digits
        (189, "bad_price"),
        (None, "bad_price"),
        ("189.234", "too_many_decimals"),
    ],
)
def test_bad_prices(raw: object, reason: str) -> None:
    with pytest.raises(QuoteError) as caught:
        parse_price(raw, 2)
    assert caught.value.reason == reason
    assert str(caught.value)  # a message a person can act on


def test_amounts_take_any_places_unless_told() -> None:
    assert parse_amount("0.00012345", "size") == Decimal("0.00012345")
    with pytest.raises(QuoteError) as caught:
        parse_amount("-3", "size")
    assert caught.value.reason == "bad_size"


@pytest.mark.parametrize("raw", ["buy", "sell"])
def test_sides(raw: str) -> None:
    assert parse_side(raw) == raw


@pytest.mark.parametrize("raw", ["BUY", "bid", "", 1, None])
def test_bad_sides(raw: object) -> None:
    with pytest.raises(QuoteError) as caught:
        parse_side(raw)
    assert caught.value.reason == "bad_side"
