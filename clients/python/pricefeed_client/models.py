"""What the service returns: `Tick`, `Candle`, `Symbol`, as frozen dataclasses with `Decimal`
prices, `int` sequence numbers and epoch-millisecond times (with `datetime` helpers).

These classes are the wire format too: each field is a JSON field of the same name, and the
service builds the AsyncAPI document (`/asyncapi.json`) from them (pricefeed_client.messages).
`from_json` parses what the service sends and `to_json` gives it back, prices as decimal
strings (never floats)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from pricefeed_client.errors import ProtocolError


class WireSchema:
    """A JSON Schema for a field, for tools that build one from these classes (the server's
    pydantic finds it by this method's name); the client itself never calls it."""

    __slots__ = ("schema",)

    def __init__(self, **schema: object) -> None:
        self.schema = schema

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: Any) -> dict[str, Any]:
        return dict(self.schema)


DECIMAL_PATTERN = r"^-?[0-9]+(\.[0-9]+)?$"
DecimalString = Annotated[
    Decimal,
    WireSchema(
        type="string",
        pattern=DECIMAL_PATTERN,
        description="A decimal number as a string, never a float",
        examples=["189.2300"],
    ),
]
EpochMillis = Annotated[
    int, WireSchema(type="integer", minimum=0, description="Unix epoch milliseconds (UTC)")
]
Seq = Annotated[
    int,
    WireSchema(
        type="integer",
        minimum=0,
        maximum=2**63 - 1,
        description="Per symbol, +1 for every tick published: a jump is a gap",
    ),
]


def as_datetime(millis: int) -> datetime:
    """Epoch milliseconds as an aware UTC datetime."""
    return datetime.fromtimestamp(millis / 1000, tz=UTC)


def as_millis(moment: datetime | int) -> int:
    """A datetime (naive ones are taken as UTC) or epoch milliseconds, as epoch milliseconds."""
    if isinstance(moment, int):
        return moment
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


@dataclass(frozen=True, slots=True, kw_only=True)
class Tick:
    """One price of one symbol. `type` is `snapshot` for the first of a subscription (the
    latest tick, or a reset); `reset` marks a snapshot after a gap that cannot be filled."""

    type: Literal["tick", "snapshot"]
    symbol: str
    price: DecimalString
    ts: EpochMillis
    seq: Seq
    bid: DecimalString | None = None
    ask: DecimalString | None = None
    volume: DecimalString | None = None
    size: DecimalString | None = None
    side: Literal["buy", "sell"] | None = None
    source_ts: EpochMillis | None = None
    reset: bool = False

    @property
    def time(self) -> datetime:
        """When the producer stamped it (UTC)."""
        return as_datetime(self.ts)

    @property
    def source_time(self) -> datetime | None:
        """The source's own time for it, when the source gives one (UTC)."""
        return None if self.source_ts is None else as_datetime(self.source_ts)

    @property
    def is_snapshot(self) -> bool:
        return self.type == "snapshot"

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Tick:
        kind = body.get("type", "tick")  # REST answers carry "tick"; streams say which
        side = body.get("side")
        if kind not in ("tick", "snapshot") or side not in (None, "buy", "sell"):
            raise ProtocolError(f"not a tick: {dict(body)!r:.200}")
        return cls(
            type=kind,
            symbol=_text(body, "symbol"),
            price=_decimal(body, "price"),
            ts=_integer(body, "ts"),
            seq=_integer(body, "seq"),
            bid=_optional_decimal(body, "bid"),
            ask=_optional_decimal(body, "ask"),
            volume=_optional_decimal(body, "volume"),
            size=_optional_decimal(body, "size"),
            side=side,
            source_ts=_optional_integer(body, "source_ts"),
            reset=body.get("reset") is True,
        )

    def to_json(self) -> dict[str, Any]:
        """The wire shape: prices as decimal strings, absent fields left out."""
        body: dict[str, Any] = {
            "type": self.type,
            "symbol": self.symbol,
            "price": str(self.price),
            "ts": self.ts,
            "seq": self.seq,
        }
        for name in ("bid", "ask", "volume", "size"):
            value = getattr(self, name)
            if value is not None:
                body[name] = str(value)
        if self.side is not None:
            body["side"] = self.side
        if self.source_ts is not None:
            body["source_ts"] = self.source_ts
        if self.reset:
            body["reset"] = True
        return body


@dataclass(frozen=True, slots=True, kw_only=True)
class Candle:
    """OHLCV of one interval that starts at `start`; the newest one may still be forming."""

    start: EpochMillis
    open: DecimalString
    high: DecimalString
    low: DecimalString
    close: DecimalString
    volume: DecimalString

    @property
    def start_time(self) -> datetime:
        return as_datetime(self.start)

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Candle:
        return cls(
            start=_integer(body, "start"),
            open=_decimal(body, "open"),
            high=_decimal(body, "high"),
            low=_decimal(body, "low"),
            close=_decimal(body, "close"),
            volume=_decimal(body, "volume"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "start": self.start,
            **{k: str(getattr(self, k)) for k in ("open", "high", "low", "close", "volume")},
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Symbol:
    """An instrument the service quotes, and whether these credentials may read it."""

    symbol: str
    name: str
    asset_class: str
    price_decimals: int
    entitled: bool

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Symbol:
        entitled = body.get("entitled")
        if not isinstance(entitled, bool):
            raise ProtocolError(f"'entitled' is not a boolean in {dict(body)!r:.200}")
        return cls(
            symbol=_text(body, "symbol"),
            name=_text(body, "name"),
            asset_class=_text(body, "asset_class"),
            price_decimals=_integer(body, "price_decimals"),
            entitled=entitled,
        )


def _text(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str):
        raise ProtocolError(f"{name!r} is not a string in {dict(body)!r:.200}")
    return value


def _integer(body: Mapping[str, Any], name: str) -> int:
    value = body.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"{name!r} is not an integer in {dict(body)!r:.200}")
    return value


def _optional_integer(body: Mapping[str, Any], name: str) -> int | None:
    return None if body.get(name) is None else _integer(body, name)


def _decimal(body: Mapping[str, Any], name: str) -> Decimal:
    value = body.get(name)
    if not isinstance(value, str):  # a float would have lost digits already
        raise ProtocolError(f"{name!r} is not a decimal string in {dict(body)!r:.200}")
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise ProtocolError(f"{name!r} is not a decimal: {value!r:.40}") from None
    if not number.is_finite():
        raise ProtocolError(f"{name!r} is not a finite decimal: {value!r:.40}")
    return number


def _optional_decimal(body: Mapping[str, Any], name: str) -> Decimal | None:
    return None if body.get(name) is None else _decimal(body, name)
