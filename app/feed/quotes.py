"""Checking a quote's fields, the same way for every source: a pushed quote that fails gets
a 422 naming its reason; a replay row or an upstream message that fails is counted under
that reason and skipped.

Prices are decimal strings (never floats: a float has already lost digits), positive,
finite, with at most the instrument's decimals; trailing zeros do not count.
"""

from __future__ import annotations

import functools
from decimal import Decimal, InvalidOperation

SIDES = frozenset({"buy", "sell"})
# Beyond any real price or amount, and beyond what NUMERIC(24, 8) keeps.
MAX_DIGITS_BEFORE_POINT = 16


class QuoteError(ValueError):
    """A field that cannot go into a tick. `reason` is a short code (a metric label)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse_amount(raw: object, field: str, *, decimals: int | None = None) -> Decimal:
    """A positive decimal string (`"189.23"`), at most `decimals` places when given."""
    if not isinstance(raw, str):
        raise QuoteError(f"bad_{field}", f'{field} must be a decimal string, like "189.23"')
    text = raw.strip()
    if len(text) > 40 or not text.replace(".", "").isdigit():
        # Refuses exponents ("1e9999"), signs, "NaN" and "Infinity" before Decimal sees them.
        raise QuoteError(f"bad_{field}", f"{field} must be a positive decimal string: {raw[:40]!r}")
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise QuoteError(f"bad_{field}", f"{field} is not a decimal: {raw[:40]!r}") from None
    if value <= 0:
        raise QuoteError(f"bad_{field}", f"{field} must be greater than zero: {raw!r}")
    if value.adjusted() >= MAX_DIGITS_BEFORE_POINT:
        raise QuoteError(f"bad_{field}", f"{field} is out of range: {raw[:40]!r}")
    if decimals is not None:
        exponent = value.normalize().as_tuple().exponent
        assert isinstance(exponent, int)  # finite, checked above
        if -exponent > decimals:
            raise QuoteError(
                "too_many_decimals", f"{field} {raw!r} has more than {decimals} decimals"
            )
        value = value.quantize(_step(decimals))
    return value


@functools.cache
def _step(decimals: int) -> Decimal:
    """10 ** -decimals: what an amount with `decimals` places is quantized to."""
    return Decimal(1).scaleb(-decimals)


def parse_price(raw: object, decimals: int) -> Decimal:
    """A price for an instrument quoted to `decimals` places, given that many places."""
    return parse_amount(raw, "price", decimals=decimals)


def parse_side(raw: object) -> str:
    if not isinstance(raw, str) or raw not in SIDES:
        raise QuoteError("bad_side", f'side must be "buy" or "sell", not {str(raw)[:20]!r}')
    return raw
