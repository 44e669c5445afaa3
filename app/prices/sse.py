"""Server-Sent Events: the stream for clients that cannot speak WebSocket.

A stuck reader is treated as on a WebSocket: a bounded kernel send buffer
(`WS_SEND_BUFFER_BYTES`), and a send stuck for `WS_SEND_TIMEOUT_SECONDS`, or past the token's
expiry, ends the stream and aborts the connection (a close would wait for the reader).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator
from collections.abc import Set as AbstractSet
from typing import Annotated

import orjson
from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import StreamingResponse
from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from app import metrics
from app.deps import StateDep, authenticate_stream
from app.errors import (
    CloseCode,
    ErrorOutDoc,
    Forbidden,
    InvalidRequest,
    Unavailable,
    UnknownSymbol,
)
from app.frames import request_transport
from app.origins import origin_allowed
from app.prices.hub import FanoutHub
from app.prices.outbox import Outbox
from app.prices.streams import no_longer_available
from app.prices.ticks import MAX_SEQ, normalise_symbol, parse_seq
from app.security import Principal

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["streams"])

_KEEPALIVE_SECONDS = 15.0
# A replayed tick is a `tick` event; a reset is a `snapshot` event (its data says `reset`).
_SSE_EVENTS = {"replay": "tick", "reset": "snapshot"}


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
        self._notices: list[str] = []  # `error` events to send before the next frames

    async def close(self, code: int, reason: str) -> None:
        self.ended = (code, reason)
        self.wakeup.set()

    async def withdraw(self, symbols: AbstractSet[str]) -> bool:
        """`symbols` are no longer served (instruments disabled): an `error` event
        (`unknown_symbol`) names them, and nothing of them follows. The stream goes on with
        its other symbols; if none is left, it ends there (a browser's EventSource then
        reconnects, gets 404 and stops: no retry loop on a symbol that is gone)."""
        gone = sorted(self.outbox.symbols & symbols)
        if not gone or self.ended is not None:
            return False
        self.hub.detach(self.outbox, gone)  # their queued frames go too
        message = no_longer_available(gone)
        self._notices.append(_error_event("unknown_symbol", message, symbols=gone))
        if not self.outbox.symbols:
            await self.close(CloseCode.UNKNOWN_SYMBOL, message)
        self.wakeup.set()
        return True

    def take_notices(self) -> str:
        notices, self._notices = self._notices, []
        return "".join(notices)

    async def wait(self, timeout: float) -> bool:
        """Until frames or notices are queued (True) or `timeout` passes (False)."""
        if not len(self.outbox) and not self._notices:
            try:
                async with asyncio.timeout(timeout):
                    await self.wakeup.wait()
            except TimeoutError:
                return False
        self.wakeup.clear()
        return bool(len(self.outbox) or self._notices)


class EventStreamResponse(StreamingResponse):
    """The response of one EventStream, every send bounded by `send_timeout` and the token's
    expiry. Past either, the stream ends and the connection is aborted, where the server
    offers its transport (pricefeed's HTTP protocol; otherwise uvicorn closes it once the
    reader has taken what is buffered)."""

    def __init__(
        self,
        content: AsyncIterator[str],
        stream: EventStream,
        *,
        send_timeout: float,
        send_buffer_bytes: int,
    ) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._stream = stream
        self._send_timeout = send_timeout
        self._send_buffer_bytes = send_buffer_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        transport = request_transport(scope)
        sock = transport.get_extra_info("socket") if transport is not None else None
        if self._send_buffer_bytes and sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._send_buffer_bytes)
        stream = self._stream
        stuck = False

        async def bounded_send(message: Message) -> None:
            nonlocal stuck
            if stuck:
                return
            timeout = min(self._send_timeout, stream.deadline - time.time())
            try:
                async with asyncio.timeout(max(timeout, 0.0)):
                    await send(message)
            except TimeoutError:
                stuck = True
                expired = time.time() >= stream.deadline
                logger.info(
                    "stream: SSE %s; closing", "token expired" if expired else "reader stuck"
                )
                await stream.close(
                    CloseCode.TOKEN_EXPIRED if expired else CloseCode.TRY_LATER, "reader too slow"
                )
                if transport is not None:
                    transport.abort()
                    await asyncio.sleep(0)  # uvicorn hears of it: the response ends quietly

        await super().__call__(scope, receive, bounded_send)


def _parse_last_event_id(value: str | None) -> tuple[str, int] | None:
    if not value:
        return None
    symbol, _, raw_seq = value.partition(":")
    normalised, seq = normalise_symbol(symbol), parse_seq(raw_seq)
    if normalised is None or seq is None:
        raise InvalidRequest(f"Last-Event-ID must look like SYMBOL:seq, seq at most {MAX_SEQ}")
    return normalised, seq


def _error_event(code: str, message: str, **fields: object) -> str:
    data = orjson.dumps({"code": code, "message": message, **fields}).decode()
    return f"event: error\ndata: {data}\n\n"


@router.get(
    "/stream",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "An event stream"},
        401: {**ErrorOutDoc, "description": "No token, or a bad or expired one"},
        403: {**ErrorOutDoc, "description": "Origin not allowed, or a symbol not entitled"},
        404: {**ErrorOutDoc, "description": "Unknown symbol"},
        429: {**ErrorOutDoc, "description": "Too many streams for the token's subject"},
        503: {**ErrorOutDoc, "description": "Price store unavailable, or the instance is full"},
    },
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
            await state.hub.attach(stream.outbox, symbol, since=since, subject=principal.subject)
    except Exception as exc:
        stream.outbox.closed = True
        state.hub.detach(stream.outbox, stream.outbox.symbols)
        await admission.__aexit__(None, None, None)
        if isinstance(exc, UnknownSymbol):  # disabled since it was resolved: 404
            raise
        raise Unavailable("prices unavailable; retry shortly") from exc

    async def events() -> AsyncIterator[str]:
        try:
            yield "retry: 2000\n\n"
            while True:
                timeout = min(_KEEPALIVE_SECONDS, stream.deadline - time.time())
                ready = await stream.wait(max(timeout, 0.0))
                notices = stream.take_notices()
                if notices:
                    yield notices
                if stream.ended is not None:
                    code, reason = stream.ended
                    if code == CloseCode.UNKNOWN_SYMBOL:
                        return  # its last symbol was withdrawn: the notice said so
                    kind = "unauthenticated" if code == CloseCode.BAD_TOKEN else "going_away"
                    yield _error_event(kind, reason or "server going away")
                    return
                if time.time() >= stream.deadline:
                    yield _error_event("token_expired", "token expired; reconnect with a new one")
                    return
                if not ready:
                    yield ": keep-alive\n\n"
                    continue
                if not len(stream.outbox):
                    continue  # only notices, sent above
                frames = stream.outbox.drain()
                stream.outbox.flushed()
                metrics.MESSAGES_SENT.inc(len(frames))
                yield "".join(
                    f"event: {_SSE_EVENTS.get(f.event, f.event)}\n"
                    f"id: {f.symbol}:{f.seq}\ndata: {f.text}\n\n"
                    for f in frames
                )
        except asyncio.CancelledError:
            raise
        finally:
            stream.outbox.closed = True
            state.hub.detach(stream.outbox, stream.outbox.symbols)
            await admission.__aexit__(None, None, None)

    return EventStreamResponse(
        events(),
        stream,
        send_timeout=state.settings.ws_send_timeout_seconds,
        send_buffer_bytes=state.settings.ws_send_buffer_bytes,
    )
