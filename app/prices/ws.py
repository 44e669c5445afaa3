"""WebSocket routes: one symbol per connection, or many over one (the protocol is in
app/prices/protocol.md, which /docs shows)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from pricefeed_client.messages import Auth, Ping, Subscribe, Unsubscribe
from pydantic import TypeAdapter, ValidationError
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from app.deps import AppState, read_app_state, read_stream_token, verify_token
from app.errors import (
    CloseCode,
    Forbidden,
    InvalidRequest,
    PricefeedError,
    Unauthenticated,
    UnknownSymbol,
)
from app.instruments.catalog import MAX_SYMBOLS_PER_REQUEST
from app.origins import origin_allowed
from app.prices.streams import Admission, RateLimiter, WebSocketStream, control
from app.prices.ticks import MAX_SEQ, parse_seq
from app.security import Principal

logger = logging.getLogger(__name__)


class BadRequest(Exception):
    """A client frame the server answers with an `error` frame; the connection stays open."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


async def _accept(websocket: WebSocket, state: AppState) -> Principal | None:
    """Check the origin (refusing the handshake), accept, then authenticate: a close code,
    unlike a refused handshake, is something a browser can read."""
    if not origin_allowed(websocket, state.settings.allowed_origins):
        await websocket.close(CloseCode.POLICY)  # before accept: an HTTP 403
        return None
    await websocket.accept()
    try:
        return verify_token(state, read_stream_token(websocket))
    except Unauthenticated as exc:
        await websocket.close(CloseCode.BAD_TOKEN, exc.message)
        return None


def _new_stream(
    websocket: WebSocket, state: AppState, principal: Principal, *, multiplexed: bool
) -> WebSocketStream:
    """The multiplexed route sends heartbeats; the per-symbol one lives and dies with its
    symbol."""
    settings = state.settings
    return WebSocketStream(
        websocket,
        hub=state.hub,
        principal=principal,
        leeway=settings.jwt_leeway_seconds,
        outbox_frames=settings.ws_outbox_frames,
        send_timeout=settings.ws_send_timeout_seconds,
        heartbeat=settings.ws_heartbeat_seconds if multiplexed else None,
        max_messages_per_second=settings.ws_max_messages_per_second,
        single_symbol=not multiplexed,
    )


async def _run(
    stream: WebSocketStream,
    state: AppState,
    handle: Handler,
    subscribe: tuple[str, int | None] | None = None,
) -> None:
    """Admit the stream, `subscribe` it (symbol, since) if asked, then serve the client's
    frames (`handle` takes each request) until the client goes or the stream is closed;
    sending happens without a task of its own (see WebSocketStream), and so does waiting for
    the client's next frame where the server lets it (`_Serving`)."""
    try:
        admission = await state.streams.enter(stream, stream.principal.subject, "websocket")
    except PricefeedError as exc:  # refused admission
        await stream.close(exc.close_code, exc.message)
        return
    started = False
    try:
        if subscribe is None or await _attach_first(stream, state, *subscribe):
            _forget_request_headers(stream.websocket)
            stream.start()
            started = True
    finally:
        if not started:
            admission.leave()
    if started:
        await _Serving(stream, state, handle, admission).run()


async def _attach_first(
    stream: WebSocketStream, state: AppState, symbol: str, since: int | None
) -> bool:
    """The per-symbol route's subscription; False once the stream is closed instead."""
    try:
        await state.hub.attach(stream.outbox, symbol, since=since, subject=stream.principal.subject)
    except UnknownSymbol as exc:  # disabled since it was resolved
        await stream.close(exc.close_code, exc.message)
        return False
    except Exception:  # the store is down: come back later
        logger.exception("stream: could not load %s", symbol)
        await stream.close(CloseCode.TRY_LATER, "prices unavailable; retry later")
        return False
    return True


Handler = Callable[[WebSocketStream, AppState, str], Awaitable[None]]


class _Serving:
    """An admitted stream's reading side, from `stream.start()` to its end. `run` takes the
    client's frames until none is waiting, then parks the connection (`stream.park`): an idle
    stream holds no task, and its next frame, or the client going away, runs `run` again in
    a new one. The last `run` ends the stream and gives its admission back."""

    __slots__ = ("_stream", "_state", "_handle", "_admission")

    def __init__(
        self, stream: WebSocketStream, state: AppState, handle: Handler, admission: Admission
    ) -> None:
        self._stream, self._state, self._handle = stream, state, handle
        self._admission = admission

    async def run(self) -> None:
        parked = False
        try:
            parked = await self._serve()
        finally:
            if not parked:
                stream = self._stream
                stream.stop()
                try:
                    await stream.close(1000, "")
                finally:
                    self._admission.leave()

    async def _serve(self) -> bool:
        """True once parked, False when the stream must end."""
        stream, state = self._stream, self._state
        max_bytes = state.settings.ws_max_message_bytes
        while not stream.closed:
            if stream.park(self.run):
                return True
            try:
                text = await _receive_text(stream, stream.limiter, max_bytes)
                if text is None:
                    return False
                await self._handle(stream, state, text)
            except BadRequest as exc:
                stream.outbox.push_control(control("error", code=exc.code, message=exc.message))
            except PricefeedError as exc:
                if exc.close_code >= 4000:
                    await stream.close(exc.close_code, exc.message)
                    return False
                stream.outbox.push_control(control("error", code=exc.code, message=exc.message))
        return False


async def _receive_text(
    stream: WebSocketStream, limiter: RateLimiter, max_bytes: int
) -> str | None:
    """The next text frame, enforcing size and rate; None when the stream must end.
    BadRequest for a binary frame (the connection stays)."""
    message = await stream.websocket.receive()
    if message["type"] == "websocket.disconnect":
        await stream.close(1000, "")
        return None
    if not limiter.allow():
        await stream.close(CloseCode.POLICY, "too many messages per second")
        return None
    text: str | None = message.get("text")
    data = text.encode() if text is not None else (message.get("bytes") or b"")
    if len(data) > max_bytes:
        await stream.close(CloseCode.TOO_BIG, f"frames are limited to {max_bytes} bytes")
        return None
    if text is None:
        raise BadRequest("invalid_message", "send JSON text frames, not binary")
    return text


def _forget_request_headers(websocket: WebSocket) -> None:
    """Past the origin check, the token and admission, nothing reads the request's headers
    again, yet the ASGI scope (and starlette's `Headers`, a view of the same list) would keep
    them for as long as the connection lives: ~0.9 KB with a bare client, a few KB with a
    browser's cookies and user agent, per idle connection. Emptied in place, so that every
    view of the list lets go of them."""
    headers = websocket.scope.get("headers")
    if isinstance(headers, list):
        headers.clear()


async def stream_symbol(websocket: WebSocket) -> None:
    """One symbol: a snapshot (or the ticks after `since`), then every tick."""
    symbol: str = websocket.path_params["symbol"]
    state = read_app_state(websocket)
    principal = await _accept(websocket, state)
    if principal is None:
        return
    stream = _new_stream(websocket, state, principal, multiplexed=False)
    try:
        resolved = state.catalog.resolve(symbol)
        if not principal.may_read(resolved):
            raise Forbidden(f"not entitled to {resolved}")
        raw_since = websocket.query_params.get("since")
        since = None if raw_since is None else parse_seq(raw_since)
        if raw_since is not None and since is None:
            raise InvalidRequest(f"since must be an integer from 0 to {MAX_SEQ}")
    except PricefeedError as exc:
        await stream.close(exc.close_code, exc.message)
        return
    await _run(stream, state, _ignore_request, subscribe=(resolved, since))


async def _ignore_request(stream: WebSocketStream, state: AppState, text: str) -> None:
    """The one-symbol route takes no requests (the frame limits still hold: `_Serving`)."""


async def stream_many(websocket: WebSocket) -> None:
    """Many symbols over one connection, driven by subscribe/unsubscribe/ping/auth requests."""
    state = read_app_state(websocket)
    principal = await _accept(websocket, state)
    if principal is None:
        return
    stream = _new_stream(websocket, state, principal, multiplexed=True)
    stream.require_subscription(state.settings.ws_subscribe_timeout_seconds)
    await _run(stream, state, _handle_request)


def _parse(text: str) -> tuple[str, dict[str, Any]]:
    if not text:
        raise BadRequest("invalid_json", "the frame is empty; send a JSON request")
    try:
        request = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise BadRequest("invalid_json", "the frame is not valid JSON") from None
    if not isinstance(request, dict):
        raise BadRequest("invalid_message", "a request is a JSON object with an 'op'")
    op = request.get("op")
    if not isinstance(op, str):
        raise BadRequest("invalid_message", "'op' must be a string")
    return op, request


def _symbols_field(request: dict[str, Any]) -> list[str]:
    symbols = request.get("symbols")
    if (
        not isinstance(symbols, list)
        or not symbols
        or len(symbols) > MAX_SYMBOLS_PER_REQUEST
        or not all(isinstance(s, str) for s in symbols)
    ):
        raise BadRequest(
            "invalid_message",
            f"'symbols' must be a list of 1 to {MAX_SYMBOLS_PER_REQUEST} strings",
        )
    return symbols


def _resolve(state: AppState, raw: list[str]) -> list[str]:
    try:
        return state.catalog.resolve_many(raw)
    except PricefeedError as exc:
        raise BadRequest(exc.code, exc.message) from None


def _since_field(request: dict[str, Any]) -> dict[str, int]:
    since = request.get("since", {})
    if since is None:
        return {}
    if not isinstance(since, dict) or not all(
        type(v) is int and 0 <= v <= MAX_SEQ for v in since.values()
    ):
        raise BadRequest(
            "invalid_message", f"'since' must map symbols to integers from 0 to {MAX_SEQ}"
        )
    return {s.strip().upper(): v for s, v in since.items()}


# The requests' shapes are the SDK's dataclasses, which /asyncapi.json is built from: a request
# the spec does not allow is refused here. Strict: no "1" for 1, no 1 for true. The checks below
# add what a shape cannot say (how many symbols, the range of a seq, which symbols exist).
_REQUEST_SHAPES: dict[str, TypeAdapter[Any]] = {
    "subscribe": TypeAdapter(Subscribe),
    "unsubscribe": TypeAdapter(Unsubscribe),
    "ping": TypeAdapter(Ping),
    "auth": TypeAdapter(Auth),
}


def _check_shape(op: str, text: str) -> None:
    shape = _REQUEST_SHAPES.get(op)
    if shape is None:
        return  # an unknown op: answered as such
    try:
        shape.validate_json(text, strict=True)
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in error["loc"]) or "the request"
        raise BadRequest("invalid_message", f"{op}: {where}: {error['msg']}"[:200]) from None


async def _handle_request(stream: WebSocketStream, state: AppState, text: str) -> None:
    op, request = _parse(text)
    _check_shape(op, text)
    if op == "ping":
        stream.outbox.push_control(control("pong"))
    elif op == "subscribe":
        await _subscribe(stream, state, request)
    elif op == "unsubscribe":
        symbols = _resolve(state, _symbols_field(request))
        state.hub.detach(stream.outbox, symbols)
        stream.outbox.push_control(control("unsubscribed", symbols=symbols))
    elif op == "auth":
        _reauthenticate(stream, state, request)
    else:
        raise BadRequest(
            "unknown_op", f"unknown op {op[:32]!r}; use subscribe, unsubscribe, ping or auth"
        )


async def _subscribe(stream: WebSocketStream, state: AppState, request: dict[str, Any]) -> None:
    symbols = _resolve(state, _symbols_field(request))
    since = _since_field(request)
    batch = request.get("batch", None)
    if batch is not None and not isinstance(batch, bool):
        raise BadRequest("invalid_message", "'batch' must be true or false")
    denied = [s for s in symbols if not stream.principal.may_read(s)]
    if denied:
        raise Forbidden(f"not entitled to {', '.join(denied)}")
    current = stream.outbox.symbols
    new = [s for s in symbols if s not in current]
    limit = state.settings.ws_max_subscriptions
    if len(current) + len(new) > limit:
        raise BadRequest("too_many_subscriptions", f"at most {limit} subscriptions per connection")
    if batch is not None:
        stream.outbox.batch = batch
    stream.outbox.push_control(control("subscribed", symbols=symbols))
    for symbol in new:
        if stream.closed:  # closed (expiry, shutdown…) while an earlier symbol loaded
            return
        try:
            await state.hub.attach(
                stream.outbox,
                symbol,
                since=since.get(symbol),
                subject=stream.principal.subject,
            )
        except UnknownSymbol as exc:  # disabled since it was resolved: the others go on
            stream.outbox.push_control(
                control("error", code=exc.code, message=exc.message, symbols=[symbol])
            )
            stream.outbox.push_control(control("unsubscribed", symbols=[symbol]))
        except Exception:  # the store is down
            logger.exception("stream: could not load %s", symbol)
            state.hub.detach(stream.outbox, [symbol])
            raise BadRequest("unavailable", f"{symbol} is unavailable; retry later") from None


def _reauthenticate(stream: WebSocketStream, state: AppState, request: dict[str, Any]) -> None:
    token = request.get("token")
    if not isinstance(token, str):
        raise BadRequest("invalid_message", "'token' must be a string")
    principal = verify_token(state, token)  # Unauthenticated closes with 4401
    if principal.subject != stream.principal.subject:
        raise BadRequest("subject_mismatch", "a new token must be for the same subject")
    stream.principal = principal
    denied = sorted(s for s in stream.outbox.symbols if not principal.may_read(s))
    if denied:
        raise Forbidden(f"no longer entitled to {', '.join(denied)}")
    stream.outbox.push_control(control("authenticated", expires=int(principal.expires_at * 1000)))


async def serve_websocket(scope: Scope, receive: Receive, send: Send) -> None:
    """Route a WebSocket connection straight to its endpoint, ahead of the HTTP middleware
    stack (app/main.py): a WebSocket lives for hours, and every layer it passes through stays
    in memory that long."""
    path: str = scope["path"]
    if path == "/v1/ws":
        endpoint = stream_many
    elif path.startswith(_ONE_SYMBOL_PREFIX) and "/" not in path[len(_ONE_SYMBOL_PREFIX) :]:
        scope["path_params"] = {"symbol": path[len(_ONE_SYMBOL_PREFIX) :]}
        endpoint = stream_symbol
    else:
        await send({"type": "websocket.close", "code": 1000, "reason": ""})  # HTTP 403
        return
    await endpoint(WebSocket(scope, receive, send))


_ONE_SYMBOL_PREFIX = "/v1/ws/prices/"
