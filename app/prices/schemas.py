"""Response shapes, for the OpenAPI docs. Ticks are sent as the producer encoded them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class TickOut(BaseModel):
    type: Literal["tick"] = "tick"
    symbol: str = Field(examples=["AAPL"])
    price: str = Field(description="Decimal string, never a float", examples=["189.2300"])
    ts: int = Field(description="Unix epoch milliseconds (UTC) at the producer")
    seq: int = Field(description="Per symbol, +1 for every tick published")
    bid: str | None = None
    ask: str | None = None
    volume: str | None = None


class InstrumentOut(BaseModel):
    symbol: str
    name: str
    asset_class: Literal["equity", "crypto", "fx"] | str
    price_decimals: int
    entitled: bool = Field(description="Whether the caller's token may read this symbol")


class CandleOut(BaseModel):
    start: int = Field(description="Bucket start, Unix epoch milliseconds")
    open: str
    high: str
    low: str
    close: str
    volume: str


class ErrorOut(BaseModel):
    detail: str
    code: str
