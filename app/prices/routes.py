"""REST snapshots: symbols, latest prices, tick history, candles."""

from __future__ import annotations

import time
from typing import Annotated, Literal

import orjson
from fastapi import APIRouter, Query, Request, Response

from app.deps import CurrentPrincipal, StateDep
from app.errors import Forbidden, InvalidRequest, Unavailable
from app.prices.candles import INTERVALS_MS
from app.prices.schemas import CandleOut, ErrorOut, InstrumentOut, TickOut
from app.prices.ticks import MAX_SEQ, parse_seq
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


_MS = "Unix epoch milliseconds"


@router.get(
    "/prices/{symbol}/history",
    response_model=list[TickOut],
    responses={
        200: {
            "description": 'Ticks, oldest first. With `start`, a `Link: <…>; rel="next"` '
            "header while more of the range remains",
            "headers": {
                "Link": {
                    "description": 'The next page of a time range (`rel="next"`)',
                    "schema": {"type": "string"},
                }
            },
        },
        422: {"description": "A bad parameter, or `since` mixed with `start`/`end`"},
        503: {"model": ErrorOut, "description": "Price store or database unavailable"},
    },
)
async def read_price_history(
    request: Request,
    symbol: str,
    principal: CurrentPrincipal,
    state: StateDep,
    since: Annotated[
        int | None,
        Query(ge=0, le=MAX_SEQ, description="Only ticks with a greater seq (not with `start`)"),
    ] = None,
    start: Annotated[
        int | None, Query(ge=0, le=MAX_SEQ, description=f"Range start, inclusive ({_MS})")
    ] = None,
    end: Annotated[
        int | None,
        Query(ge=0, le=MAX_SEQ, description=f"Range end, exclusive ({_MS}); default: now"),
    ] = None,
    cursor: Annotated[
        str | None,
        Query(description="Where the next page of a range begins: take it from `Link`"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="At most this many ticks")] = 100,
) -> Response:
    """Ticks, oldest first, from the retention window and the database (kept `HISTORY_DAYS`).
    `since=SEQ`: the ticks with a greater seq (a `seq` jump means they are stored nowhere).
    `start=MS&end=MS`: the ticks with `start <= ts < end`, a page of `limit` at a time, the
    next page in the `Link` header. Neither: the newest `limit` ticks."""
    resolved = state.catalog.resolve(symbol)
    _check_entitled(principal, [resolved])
    if since is not None and (start is not None or end is not None or cursor is not None):
        raise InvalidRequest("use either since, or start and end, not both")
    if start is None:
        if end is not None or cursor is not None:
            raise InvalidRequest("end and cursor need start")
        if since is None:
            newest = await state.history.newest_ticks(resolved, limit=limit)
            return _json([t.frame for t in newest])
        later = await state.history.ticks_after(resolved, since=since, limit=limit)
        return _json([t.frame for t in later])
    if end is None:  # now, pinned in the next page's link so the range holds still
        end = time.time_ns() // 1_000_000
    if end <= start:
        raise InvalidRequest(f"end ({end}) must be greater than start ({start})")
    after = _parse_cursor(cursor) if cursor is not None else None
    page = await state.history.ticks_between(
        resolved, start=start, end=end, after=after, limit=limit
    )
    response = _json([t.frame for t in page.ticks])
    if page.after is not None:
        ts, seq = page.after
        following = request.url.include_query_params(
            start=start, end=end, limit=limit, cursor=f"{ts}:{seq}"
        )
        response.headers["Link"] = f'<{following}>; rel="next"'
    return response


def _parse_cursor(raw: str) -> tuple[int, int]:
    """`ts:seq`, as a `Link` gave it."""
    ts, _, seq = raw.partition(":")
    parsed_ts, parsed_seq = parse_seq(ts), parse_seq(seq)
    if parsed_ts is None or parsed_seq is None:
        raise InvalidRequest("cursor must be ts:seq, as the Link header gave it")
    return parsed_ts, parsed_seq


@router.get(
    "/prices/{symbol}/candles",
    response_model=list[CandleOut],
    responses={503: {"model": ErrorOut, "description": "Price store or database unavailable"}},
)
async def read_candles(
    symbol: str,
    principal: CurrentPrincipal,
    state: StateDep,
    interval: Annotated[
        Literal["1m", "5m", "1h", "1d"], Query(description="Candle length; days are UTC days")
    ] = "1m",
    start: Annotated[
        int | None,
        Query(ge=0, le=MAX_SEQ, description=f"Candles starting at or after this ({_MS})"),
    ] = None,
    end: Annotated[
        int | None, Query(ge=0, le=MAX_SEQ, description=f"Candles starting before this ({_MS})")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="At most this many candles")] = 100,
) -> Response:
    """OHLCV candles, oldest first: the first `limit` from `start`, or the newest `limit`
    without it. Kept in the database, so they outlive a restart of Redis or of every
    instance; the last one may still be forming (it is as current as the latest tick)."""
    assert interval in INTERVALS_MS
    resolved = state.catalog.resolve(symbol)
    _check_entitled(principal, [resolved])
    if start is not None and end is not None and end <= start:
        raise InvalidRequest(f"end ({end}) must be greater than start ({start})")
    candles = await state.history.candles(resolved, interval, start=start, end=end, limit=limit)
    return _json([c.encode() for c in candles])
