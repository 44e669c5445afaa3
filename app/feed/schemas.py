"""What `POST /v1/ingest` takes and answers: the shape of a pushed batch. Shape only; what a
quote means (a known symbol, a price the instrument can quote) is checked by the route with
app/feed/quotes.py, the same checks every source's quotes pass."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import PydanticCustomError

MAX_QUOTES_PER_BATCH = 1000
# The latest epoch ms a `source_ts` may be: the last millisecond of the year 9999.
MAX_SOURCE_TS = 253_402_300_799_999

_DecimalText = Annotated[
    str | None,
    Field(default=None, max_length=40),
    WithJsonSchema(
        {
            "anyOf": [
                {
                    "type": "string",
                    "pattern": r"^\s*([0-9]+\.?[0-9]*|\.[0-9]+)\s*$",
                    "maxLength": 40,
                },
                {"type": "null"},
            ],
            "description": "A positive decimal string",
        }
    ),
]


_JSON_KINDS = {bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}


class QuoteIn(BaseModel):
    """One price. Only `symbol` and `price` are required; the others go into the tick."""

    model_config = ConfigDict(extra="forbid")

    symbol: str = Field(
        min_length=1, max_length=32, description="An active instrument", examples=["AAPL"]
    )
    price: str = Field(
        max_length=40,
        description="A positive decimal string (never a JSON number: a float has already lost "
        "digits), with at most the instrument's `price_decimals`",
        examples=["189.23"],
        json_schema_extra={"pattern": r"^\s*([0-9]+\.?[0-9]*|\.[0-9]+)\s*$"},
    )
    bid: _DecimalText = None
    ask: _DecimalText = None
    volume: _DecimalText = None
    size: _DecimalText = None
    side: Annotated[
        str | None,
        Field(default=None, max_length=8),
        WithJsonSchema({"anyOf": [{"enum": ["buy", "sell"]}, {"type": "null"}]}),
    ] = None
    source_ts: StrictInt | None = Field(
        default=None,
        ge=0,
        le=MAX_SOURCE_TS,
        description="The source's own time of the price, epoch milliseconds",
        examples=[1733580000123],
    )

    @field_validator("price", "bid", "ask", "volume", "size", mode="before")
    @classmethod
    def _a_string_not_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and not isinstance(value, str):
            raise PydanticCustomError(
                f"bad_{info.field_name}",
                '{field} must be a decimal string like "189.23", not a JSON {kind}',
                {"field": info.field_name, "kind": _JSON_KINDS.get(type(value), "value")},
            )
        return value


INGEST_EXAMPLE: dict[str, Any] = {
    "quotes": [
        {"symbol": "AAPL", "price": "189.23"},
        {
            "symbol": "BTC-USD",
            "price": "64250.50",
            "bid": "64250.00",
            "ask": "64251.00",
            "size": "0.015",
            "side": "buy",
            "source_ts": 1733580000123,
        },
    ]
}


class IngestIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [INGEST_EXAMPLE]})

    quotes: list[QuoteIn] = Field(
        min_length=1,
        max_length=MAX_QUOTES_PER_BATCH,
        description="Published in this order: each becomes one tick with its symbol's next seq",
    )


class IngestOut(BaseModel):
    accepted: int = Field(description="Quotes queued for the producer: all of the batch")
