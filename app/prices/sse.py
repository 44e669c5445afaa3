"""Server-Sent Events: the stream for clients that cannot speak WebSocket."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated

import orjson
from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import StreamingResponse
from starlette.requests import Request

from app import metrics
from app.deps import StateDep, authenticate_stream
from app.errors import Forbidden, InvalidRequest, Unavailable
from app.origins import origin_allowed
from app.prices.hub import FanoutHub
from app.prices.outbox import Outbox
from app.prices.ticks import MAX_SEQ, normalise_symbol, parse_seq
from app.security import Principal

router = APIRouter(prefix="/v1", tags=["streams"])

_KEEPALIVE_SECONDS = 15.0


class EventStream:
    """One SSE response; `close` (on shutdown) ends it with an `error` event."""

    def __init__(
        self, hub: FanoutHub, principal: Principal, *, outbox_frames: int, leeway: float
    ) -> None:
        self.hub = hub
        self.principal = principal
        self.wakeup = asyncio.Event()
        self.outbox = Outbox(limit=outbox_frames, on_queued=self.wakeup.set)
        self.deadline = principal.expires_at + leeway
        self.ended: tuple[int, str] | None = None

    async def close(self, code: int, reason: str) -> None:
        self.ended = (code, reason)
        self.wakeup.set()

    async def wait(self, timeout: float) -> bool:
        """Until frames are queued (True) or `timeout` passes (False)."""
        if not len(self.outbox):
            try:
                await asyncio.wait_for(self.wakeup.wait(), timeout)
            except TimeoutError:
                return False
        self.wakeup.clear()
        return bool(len(self.outbox))


def _parse_last_event_id(value: str | None) -> tuple[str, int] | None:
    if not value:
        return None
    symbol, _, raw_seq = value.partition(":")
    normalised, seq = normalise_symbol(symbol), parse_seq(raw_seq)
    if normalised is None or seq is None:
        raise InvalidRequest(f"Last-Event-ID must look like SYMBOL:seq, seq at most {MAX_SEQ}")
    return normalised, seq


def _error_event(code: str, message: str) -> str:
    return f"event: error\ndata: {orjson.dumps({'code': code, 'message': message}).decode()}\n\n"


@router.get(
    "/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "An event stream"}},
)
async def stream_events(
    principal: Annotated[Principal, Depends(authenticate_stream)],
    request: Request,
    state: StateDep,
    symbols: Annotated[str, Query(description="Comma-separated, e.g. AAPL,MSFT", min_length=1)],
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
    token: Annotated[str | None, Query(description="The JWT, for browsers (EventSource)")] = None,
) -> StreamingResponse:
    """Server-Sent Events: `event: snapshot` per symbol, then `event: tick`; `id: SYMBOL:seq`.
    Reconnecting with `Last-Event-ID` resumes that symbol from its seq (the others start
    from a snapshot). Token: `Authorization: Bearer` or `?token=`."""
    if not origin_allowed(request, state.settings.allowed_origins):
        raise Forbidden("origin not allowed")
    resolved = state.catalog.resolve_many(symbols.split(","))
    denied = [s for s in resolved if not principal.may_read(s)]
    if denied:
        raise Forbidden(f"not entitled to {', '.join(denied)}")
    resume = _parse_last_event_id(last_event_id)
    stream = EventStream(
        state.hub,
        principal,
        outbox_frames=state.settings.ws_outbox_frames,
        leeway=state.settings.jwt_leeway_seconds,
    )
    admission = state.streams.admit(stream, principal.subject, "sse")
    await admission.__aenter__()  # raises 503 at capacity, 429 past the per-subject limit
    try:  # subscribe before answering: a store outage is a 503, not a broken 200
        for symbol in resolved:
            since = resume[1] if resume is not None and resume[0] == symbol else None
            await state.hub.attach(stream.outbox, symbol, since=since)
    except Exception as exc:
        stream.outbox.closed = True
        state.hub.detach(stream.outbox, stream.outbox.symbols)
        await admission.__aexit__(None, None, None)
        raise Unavailable("prices unavailable; retry shortly") from exc

    async def events() -> AsyncIterator[str]:
        try:
            yield "retry: 2000\n\n"
            while True:
                timeout = min(_KEEPALIVE_SECONDS, stream.deadline - time.time())
                ready = await stream.wait(max(timeout, 0.0))
                if stream.ended is not None:
                    yield _error_event("going_away", stream.ended[1] or "server going away")
                    return
                if time.time() >= stream.deadline:
                    yield _error_event("token_expired", "token expired; reconnect with a new one")
                    return
                if not ready:
                    yield ": keep-alive\n\n"
                    continue
                frames = stream.outbox.drain()
                stream.outbox.flushed()
                metrics.MESSAGES_SENT.inc(len(frames))
                yield "".join(
                    f"event: {'tick' if f.event == 'replay' else f.event}\n"
                    f"id: {f.symbol}:{f.seq}\ndata: {f.text}\n\n"
                    for f in frames
                )
        except asyncio.CancelledError:
            raise
        finally:
            stream.outbox.closed = True
            state.hub.detach(stream.outbox, stream.outbox.symbols)
            await admission.__aexit__(None, None, None)

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
