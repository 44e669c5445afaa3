"""Coinbase Exchange's `ticker` message as a quote (app/feed/sources/coinbase.py reads the
feed): `price`, `best_bid`/`best_ask` at the instrument's decimals, `volume_24h`, `last_size`,
`side` and `time`, each checked as every source checks a quote (app/feed/quotes.py). A field
that fails raises QuoteError with its reason; the source counts it and skips the message."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from app.feed.quotes import QuoteError, parse_amount, parse_price, parse_side
from app.feed.sources import Quote
from app.instruments.repository import InstrumentInfo

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)


def ticker_quote(message: dict[str, Any], instrument: InstrumentInfo) -> Quote:
    """A ticker message as a quote, each field checked as every source checks it."""
    decimals = instrument.price_decimals
    return Quote(
        symbol=instrument.symbol,
        price=parse_price(message.get("price"), decimals),
        bid=_optional(message, "best_bid", "bid", decimals),
        ask=_optional(message, "best_ask", "ask", decimals),
        # A product without a trade in 24 hours reports "0": no volume, rather than a reject.
        volume=None
        if _is_zero(message.get("volume_24h"))
        else _optional(message, "volume_24h", "volume"),
        size=_optional(message, "last_size", "size"),
        side=None if message.get("side") is None else parse_side(message["side"]),
        source_ts=_epoch_ms(message.get("time")),
    )


def _optional(
    message: dict[str, Any], key: str, field: str, decimals: int | None = None
) -> Decimal | None:
    raw = message.get(key)
    return None if raw is None else parse_amount(raw, field, decimals=decimals)


def _is_zero(raw: object) -> bool:
    return isinstance(raw, str) and raw.strip().strip("0") in ("", ".")


def _epoch_ms(raw: object) -> int | None:
    """An ISO 8601 time with its offset (`2014-11-07T08:19:27.028459Z`) in epoch ms."""
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise QuoteError("bad_time", "time must be an ISO 8601 string")
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise QuoteError("bad_time", f"time is not ISO 8601: {raw[:40]!r}") from None
    if moment.tzinfo is None:
        raise QuoteError("bad_time", f"time has no UTC offset: {raw[:40]!r}")
    return (moment - _EPOCH) // _MILLISECOND
