"""`Watch`: one `watch` of the multiplexed WebSocket (`/v1/ws`), across as many connections as
it takes.

It keeps the last `seq` of each symbol and hands on each tick once, in order. On a new
connection it subscribes with `since` (the service replays what was missed); a `seq` jump
(conflation, or a resume past the retention window) is filled from `/history` as far as the
service still has it and reported as a `Gap`; a sequence that restarts, or a snapshot marked
`reset`, is reported as a `Reset`. The token is renewed on the open connection (`op: auth`)
before it expires; if the service closes with 4408 anyway, it is renewed and the watch
reconnects. Other closes reconnect after a jittered backoff that starts over once a
connection delivered a tick; 4401 twice in a row, 4403 and 4404 raise (errors.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from pricefeed_client.backoff import Backoff
from pricefeed_client.errors import (
    ApiError,
    CloseCode,
    PolicyViolation,
    PricefeedError,
    ProtocolError,
    UnknownSymbol,
    refusal,
)
from pricefeed_client.events import Connected, Disconnected, Dropped, Gap, Reset, StreamEvent
from pricefeed_client.messages import (
    Auth,
    ErrorFrame,
    Subscribe,
    encode_request,
    parse_frame,
)
from pricefeed_client.models import Tick
from pricefeed_client.tokens import TokenKeeper

logger = logging.getLogger("pricefeed_client")

RENEW_RETRY_SECONDS = 5.0
HISTORY_PAGE = 1000
_FINAL = frozenset({CloseCode.NOT_ENTITLED, CloseCode.UNKNOWN_SYMBOL, CloseCode.TOO_BIG})
_REFUSED_ERRORS = {"too_many_subscriptions": PolicyViolation}
ReadHistory = Callable[[str, int, int], Awaitable[list[Tick]]]  # symbol, after seq, limit


class _Retry(Exception):
    """The service asked to come back later (an `unavailable` error)."""


class Watch:
    def __init__(
        self,
        *,
        url: str,
        symbols: Sequence[str],
        tokens: TokenKeeper,
        read_history: ReadHistory | None,
        open_timeout: float,
        receive_buffer: int | None = None,
    ) -> None:
        self.url = url
        self.wanted = list(dict.fromkeys(s.strip().upper() for s in symbols))
        self.last: dict[str, int] = {}  # symbol → highest seq handed on
        self._tokens = tokens
        self._read_history = read_history
        self._open_timeout = open_timeout
        self._receive_buffer = receive_buffer
        self._backoff = Backoff()

    async def run(self) -> AsyncGenerator[Tick | StreamEvent, None]:
        refused_tokens = 0  # 4401s in a row: a fresh token is tried once
        while True:
            code: int | None = None
            try:
                async with await self._connect() as ws:
                    since = {s: self.last[s] for s in self.wanted if s in self.last}
                    await _send(
                        ws, Subscribe(op="subscribe", symbols=self.wanted, since=since, batch=True)
                    )
                    yield Connected(self.url, since)
                    while True:
                        for body in await self._receive(ws):
                            async for item in self._handle(body):
                                if isinstance(item, Tick):
                                    self._backoff.reset()  # this connection worked
                                    refused_tokens = 0
                                yield item
            except ConnectionClosed as exc:
                code, reason = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (None, "")
                if code in _FINAL:
                    raise refusal(code, reason) from None
                if code in (CloseCode.BAD_TOKEN, CloseCode.TOKEN_EXPIRED):
                    self._tokens.forget()
                if code == CloseCode.BAD_TOKEN:
                    refused_tokens += 1
                    if refused_tokens > 1:
                        raise refusal(code, reason) from None
            except ApiError as exc:  # from the token endpoint: only a busy one is retried
                if exc.status < 500 and exc.status != 429:
                    raise
                reason = str(exc)
            except (OSError, InvalidHandshake, httpx.TransportError, _Retry) as exc:
                reason = str(exc) or type(exc).__name__
            delay = self._backoff.next_delay()
            yield Disconnected(code, reason, delay)
            await asyncio.sleep(delay)

    async def _connect(self) -> ClientConnection:
        headers = {"Authorization": f"Bearer {await self._tokens.current()}"}
        if self._receive_buffer is None:
            return await connect(
                self.url, additional_headers=headers, open_timeout=self._open_timeout
            )
        sock = await _small_buffer_socket(self.url, self._receive_buffer)
        try:
            return await connect(
                self.url,
                additional_headers=headers,
                sock=sock,
                max_queue=1,
                open_timeout=self._open_timeout,
            )
        except BaseException:
            sock.close()
            raise

    async def _receive(self, ws: ClientConnection) -> list[dict[str, Any]]:
        """The objects of the next frame (a batch frame holds several), renewing the token on
        the open connection when it is due."""
        while True:
            wait = self._tokens.renew_in()
            if wait <= 0:
                await self._renew_on(ws)
                continue
            try:
                async with asyncio.timeout(wait):
                    data = await ws.recv()  # cancelling recv() loses no message
            except TimeoutError:
                continue
            try:
                body = json.loads(data)
            except ValueError:
                logger.warning("ignored a frame that is not JSON")
                continue
            items = body if isinstance(body, list) else [body]
            return [item for item in items if isinstance(item, dict)]

    async def _renew_on(self, ws: ClientConnection) -> None:
        try:
            token = await self._tokens.renew()
        except (httpx.HTTPError, PricefeedError) as exc:
            # Keep streaming: at expiry the service closes with 4408, and we reconnect then.
            logger.warning(
                "could not renew the token (%s); retrying in %.0fs", exc, RENEW_RETRY_SECONDS
            )
            self._tokens.postpone(RENEW_RETRY_SECONDS)
            return
        await _send(ws, Auth(op="auth", token=token))

    async def _handle(self, body: dict[str, Any]) -> AsyncIterator[Tick | StreamEvent]:
        try:
            frame = parse_frame(body)
        except ProtocolError as exc:
            logger.warning("ignored a frame: %s", exc)
            return
        if isinstance(frame, Tick):
            async for item in self._admit(frame):
                yield item
        elif isinstance(frame, ErrorFrame):
            dropped = self._on_error(frame)
            if dropped is not None:
                yield dropped

    def _on_error(self, frame: ErrorFrame) -> Dropped | None:
        if frame.code == "unknown_symbol":
            gone = [s for s in (frame.symbols or []) if s in self.wanted]
            rest = [s for s in self.wanted if s not in gone]
            if not gone or not rest:  # refused outright, or nothing left to watch
                raise UnknownSymbol(CloseCode.UNKNOWN_SYMBOL, frame.message)
            self.wanted = rest
            return Dropped(tuple(gone), frame.message)
        if frame.code in _REFUSED_ERRORS:  # asking again would be refused again
            raise _REFUSED_ERRORS[frame.code](CloseCode.POLICY, frame.message)
        if frame.code == "unavailable":
            raise _Retry(f"service: {frame.message}")
        logger.warning("service error %s: %s", frame.code, frame.message)
        return None

    async def _admit(self, tick: Tick) -> AsyncIterator[Tick | StreamEvent]:
        """`tick`, if new for its symbol, after what explains or fills any jump before it."""
        prev = self.last.get(tick.symbol)
        if prev is not None and (tick.reset or (tick.is_snapshot and tick.seq < prev)):
            # Behind what was seen: the service restarted the sequence (an in-memory store
            # lost); a reset: ticks between are gone. Follow it rather than go silent.
            yield Reset(tick.symbol, prev, tick.seq)
        elif prev is not None and tick.seq <= prev:
            return  # already handed on (a replay overlapping what was seen)
        elif prev is not None and tick.seq > prev + 1:
            refilled = await self._refill(tick.symbol, prev, tick.seq)
            yield Gap(
                tick.symbol, prev, tick.seq, len(refilled), tick.seq - prev - 1 - len(refilled)
            )
            for old in refilled:
                yield old
        self.last[tick.symbol] = tick.seq
        yield tick

    async def _refill(self, symbol: str, after: int, before: int) -> list[Tick]:
        """The ticks between `after` and `before` the service still has, in order."""
        if self._read_history is None:
            return []
        found: list[Tick] = []
        cursor = after
        while cursor < before - 1:
            try:
                page = await self._read_history(
                    symbol, cursor, min(before - cursor - 1, HISTORY_PAGE)
                )
            except (httpx.HTTPError, PricefeedError) as exc:
                logger.warning("could not refill %s after seq %d: %s", symbol, cursor, exc)
                break
            fresh = [t for t in page if cursor < t.seq < before]
            if not fresh:
                break
            found += fresh
            cursor = fresh[-1].seq
            if len(page) < min(before - cursor - 1, HISTORY_PAGE):
                break
        # As ticks, not snapshots, and each seq once: what the stream would have sent.
        unique = {t.seq: t for t in found}
        return [_as_tick(unique[seq]) for seq in sorted(unique)]


def log_event(event: StreamEvent) -> None:
    """An event nobody asked for, on the `pricefeed_client` logger."""
    logger.log(logging.INFO if isinstance(event, Connected) else logging.WARNING, "%s", event)


def _as_tick(tick: Tick) -> Tick:
    if tick.type == "tick":
        return tick
    return Tick.from_json({**tick.to_json(), "type": "tick"})


async def _send(ws: ClientConnection, message: Auth | Subscribe) -> None:
    await ws.send(json.dumps(encode_request(message)))


async def _small_buffer_socket(url: str, receive_buffer: int) -> socket.socket:
    """A connected socket whose receive buffer is set before it connects (the TCP window is
    agreed then)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    loop = asyncio.get_running_loop()
    family, kind, proto, _, address = (
        await loop.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock
