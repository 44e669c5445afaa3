"""REST snapshots: symbols, latest prices, recent history, candles."""

from __future__ import annotations

from typing import Annotated, Literal

import orjson
from fastapi import APIRouter, Query, Response

from app.deps import CurrentPrincipal, StateDep
from app.errors import Forbidden, Unavailable
from app.prices.candles import INTERVALS_MS
from app.prices.schemas import CandleOut, ErrorOut, InstrumentOut, TickOut
from app.prices.ticks import MAX_SEQ
from app.security import Principal

router = APIRouter(
    prefix="/v1",
    tags=["prices"],
    responses={
        401: {"model": ErrorOut, "description": "No token, or a bad or expired one"},
        403: {"model": ErrorOut, "description": "The token is not entitled to the symbol"},
        404: {"model": ErrorOut, "description": "Unknown symbol"},
        429: {"model": ErrorOut, "description": "Too many requests: retry after `Retry-After` s"},
        503: {"model": ErrorOut, "description": "Price store unavailable"},
    },
)


def _json(frames: list[str]) -> Response:
    """A JSON array of already-encoded objects."""
    return Response("[" + ",".join(frames) + "]", media_type="application/json")


def _check_entitled(principal: Principal, symbols: list[str]) -> None:
    denied = [s for s in symbols if not principal.may_read(s)]
    if denied:
        raise Forbidden(f"not entitled to {', '.join(denied)}")


@router.get("/symbols", response_model=list[InstrumentOut])
async def list_symbols(principal: CurrentPrincipal, state: StateDep) -> Response:
    """The instruments the service quotes, and whether your token may read each."""
    return Response(
        orjson.dumps(
            [
                {
                    "symbol": i.symbol,
                    "name": i.name,
                    "asset_class": i.asset_class,
                    "price_decimals": i.price_decimals,
                    "entitled": principal.may_read(i.symbol),
                }
                for i in state.catalog.instruments
            ]
        ),
        media_type="application/json",
    )


@router.get("/prices", response_model=list[TickOut])
async def read_latest_prices(
    principal: CurrentPrincipal,
    state: StateDep,
    symbols: Annotated[str, Query(description="Comma-separated, e.g. AAPL,MSFT", min_length=1)],
) -> Response:
    """The latest tick of several symbols, in the order asked (none yet: left out)."""
    resolved = state.catalog.resolve_many(symbols.split(","))
    _check_entitled(principal, resolved)
    latest = await state.store.read_latest(resolved)
    return _json([latest[s].frame for s in resolved if s in latest])


@router.get("/prices/{symbol}", response_model=TickOut)
async def read_latest_price(symbol: str, principal: CurrentPrincipal, state: StateDep) -> Response:
    """The latest tick of one symbol."""
    resolved = state.catalog.resolve(symbol)
    _check_entitled(principal, [resolved])
    tick = (await state.store.read_latest([resolved])).get(resolved)
    if tick is None:
        raise Unavailable(f"no price for {resolved} yet; retry in a second")
    return Response(tick.frame, media_type="application/json")


@router.get("/prices/{symbol}/history", response_model=list[TickOut])
async def read_price_history(
    symbol: str,
    principal: CurrentPrincipal,
    state: StateDep,
    since: Annotated[
        int | None, Query(ge=0, le=MAX_SEQ, description="Only ticks with a greater seq")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    """Retained ticks, oldest first: those after `since`, or the newest `limit` without it.
    A `seq` jump at the start means the retention window was exceeded."""
    resolved = state.catalog.resolve(symbol)
    _check_entitled(principal, [resolved])
    history = await state.store.read_history(resolved, since=since, limit=limit)
    return _json([t.frame for t in history])


@router.get("/prices/{symbol}/candles", response_model=list[CandleOut])
async def read_candles(
    symbol: str,
    principal: CurrentPrincipal,
    state: StateDep,
    interval: Annotated[Literal["1m", "5m", "1h"], Query()] = "1m",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    """OHLCV candles, oldest first; the last one is still forming."""
    assert interval in INTERVALS_MS
    resolved = state.catalog.resolve(symbol)
    _check_entitled(principal, [resolved])
    candles = await state.store.read_candles(resolved, interval, limit=limit)
    return _json([c.encode() for c in candles])
