"""`POST /v1/ingest`: push prices in. Any instance takes a batch; it is checked whole (one bad
quote and nothing of it is published), then handed to the cluster's one producer through the
inbox (app/feed/inbox.py), which stamps `seq`: the route never publishes itself.

A publisher is not held to the REST rate limit (50 requests/s per subject by default; a feeder
pushes hundreds of batches a second). What bounds it instead: at most 1,000 quotes and
INGEST_MAX_BODY_BYTES per request (422, 413), and the inbox's cap, past which a push waits up
to INGEST_WAIT_SECONDS and then gets 503 with Retry-After: a feeder goes as fast as the
producer publishes, never faster.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from app.deps import StateDep, require_scope
from app.errors import ErrorOutDoc, PayloadTooLarge, Unavailable
from app.feed.inbox import InboxFull, InboxUnavailable
from app.feed.quotes import QuoteError, parse_amount, parse_price, parse_side
from app.feed.schemas import (
    INGEST_EXAMPLE,
    MAX_QUOTES_PER_BATCH,
    IngestIn,
    IngestOut,
    QuoteIn,
)
from app.feed.sources import Quote
from app.instruments.catalog import Catalog
from app.prices.ticks import normalise_symbol
from app.security import PUBLISH, Principal

router = APIRouter(prefix="/v1", tags=["feed"])

Publisher = Annotated[Principal, Depends(require_scope(PUBLISH))]


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with its `$defs` written in place: the request body is read by hand (its size
    bounded first), so FastAPI does not register its models, and a `$ref` would dangle."""
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    inlined: dict[str, Any] = inline(schema)
    return inlined


_BAD_BATCH_EXAMPLE = {
    "detail": "body field 'quotes.3.price': price '189.234' has more than 2 decimals",
    "code": "invalid_request",
    "errors": [
        {
            "loc": ["body", "quotes", 3, "price"],
            "msg": "price '189.234' has more than 2 decimals",
            "type": "too_many_decimals",
        }
    ],
}


@router.post(
    "/ingest",
    status_code=202,
    response_model=IngestOut,
    responses={
        401: {**ErrorOutDoc, "description": "No token, or a bad or expired one"},
        403: {**ErrorOutDoc, "description": "The token has no `publish` scope"},
        413: {**ErrorOutDoc, "description": "The body is larger than INGEST_MAX_BODY_BYTES"},
        422: {
            "description": "A bad batch, nothing of it published: not JSON, not an object, "
            "unknown fields, no quotes or more than 1,000, or a bad quote (named by its index "
            "in `loc` and `detail`, with the reason in `type`: unknown_symbol, bad_price, "
            "too_many_decimals, bad_bid, bad_ask, bad_volume, bad_size, bad_side…)",
            "content": {"application/json": {"example": _BAD_BATCH_EXAMPLE}},
        },
        429: {
            **ErrorOutDoc,
            "description": "Too many refused requests (no token, no scope): retry after "
            "`Retry-After` s",
        },
        503: {
            **ErrorOutDoc,
            "description": "The producer is behind (its inbox stayed full for "
            "INGEST_WAIT_SECONDS) or Redis is unreachable: nothing was accepted, retry after "
            "`Retry-After` s. Also when nothing here can publish (memory:// with PRODUCER=off)",
            "headers": {
                "Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}
            },
        },
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": _inline_refs(IngestIn.model_json_schema()),
                    "example": INGEST_EXAMPLE,
                }
            },
        }
    },
)
async def ingest_quotes(request: Request, publisher: Publisher, state: StateDep) -> IngestOut:
    """Push prices: each quote becomes one tick, in order, with its symbol's next `seq`, on
    every instance. Needs a token with the `publish` scope (`python -m app.admin add-client
    --scopes publish`), and no read entitlement to the symbols. `202` means the whole batch is
    queued for the producer and will be published; on any bad quote, nothing of the batch is.
    Not held to the REST rate limit: bounded by 1,000 quotes and INGEST_MAX_BODY_BYTES a
    request, and by the producer's pace (503 with Retry-After while it is behind)."""
    if state.inbox is None:
        raise Unavailable(
            "no producer takes pushed quotes here: BROADCAST_URL=memory:// with PRODUCER=off "
            "(run the producer in this process, or use Redis)"
        )
    body = await _read_body(request, limit=state.settings.ingest_max_body_bytes)
    quotes = _check_quotes(_parse_batch(body).quotes, state.catalog)
    try:
        await state.inbox.push(quotes)
    except InboxFull:
        raise Unavailable(
            f"the producer is behind: {state.settings.ingest_max_pending_batches} batches "
            "wait for it; nothing of this one was accepted, retry shortly",
            retry_after=max(1, math.ceil(state.settings.ingest_wait_seconds)),
        ) from None
    except InboxUnavailable as exc:
        raise Unavailable(
            f"the inbox is unavailable ({exc}); nothing was accepted, retry shortly",
            retry_after=1,
        ) from None
    return IngestOut(accepted=len(quotes))


async def _read_body(request: Request, *, limit: int) -> bytes:
    """The body, refused (413) as soon as it is larger than `limit`: never held whole."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_batch(body: bytes) -> IngestIn:
    """The batch's shape, or a 422 listing each problem where it is (`quotes.3.price`)."""
    try:
        return IngestIn.model_validate_json(body)
    except ValidationError as exc:
        errors = [
            {"loc": ("body", *e["loc"]), "msg": e["msg"], "type": e["type"]}
            for e in exc.errors(include_url=False, include_input=False)
        ]
        raise RequestValidationError(errors) from None


def _check_quotes(batch: list[QuoteIn], catalog: Catalog) -> list[Quote]:
    """Each quote as every source's quotes are checked (app/feed/quotes.py), against the
    instruments active now; a 422 naming every bad one, so nothing of the batch goes out."""
    assert len(batch) <= MAX_QUOTES_PER_BATCH
    quotes: list[Quote] = []
    errors: list[dict[str, Any]] = []
    for index, item in enumerate(batch):
        field = "symbol"
        try:
            symbol = normalise_symbol(item.symbol)
            instrument = catalog.get(symbol) if symbol is not None else None
            if symbol is None or instrument is None:
                raise QuoteError(
                    "unknown_symbol", f"unknown symbol {item.symbol[:32]!r} (no active instrument)"
                )
            decimals = instrument.price_decimals
            field = "price"
            price = parse_price(item.price, decimals)
            field = "bid"
            bid = None if item.bid is None else parse_amount(item.bid, "bid", decimals=decimals)
            field = "ask"
            ask = None if item.ask is None else parse_amount(item.ask, "ask", decimals=decimals)
            field = "volume"
            volume = None if item.volume is None else parse_amount(item.volume, "volume")
            field = "size"
            size = None if item.size is None else parse_amount(item.size, "size")
            field = "side"
            side = None if item.side is None else parse_side(item.side)
        except QuoteError as exc:
            errors.append(
                {"loc": ("body", "quotes", index, field), "msg": str(exc), "type": exc.reason}
            )
            continue
        quotes.append(
            Quote(
                symbol=symbol,
                price=price,
                bid=bid,
                ask=ask,
                volume=volume,
                size=size,
                side=side,
                source_ts=item.source_ts,
            )
        )
    if errors:
        raise RequestValidationError(errors)
    return quotes
