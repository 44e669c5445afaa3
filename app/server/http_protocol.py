"""uvicorn's httptools HTTP protocol (what its `auto` picks), with the connection's transport in
each request's scope (`pricefeed.transport`: an SSE response bounds its socket's send buffer and
aborts a stuck reader with it) and limits on what a client can hold before its request reaches
the app: bounded request heads (414, 431), a head timeout (408), and a cap on open connections
(503, `/healthz` excepted).

Like app/server/protocol.py it reaches into uvicorn's internals (`HttpToolsProtocol`'s parser
callbacks and `data_received`), so only app/server/guard.py imports it, and only for the
uvicorn releases it was tested with.
"""

from __future__ import annotations

import asyncio
import json
import logging
from asyncio import BaseTransport
from typing import Any, cast

import httptools
from uvicorn._types import ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from app.frames import TRANSPORT_EXTENSION, Transport

logger = logging.getLogger(__name__)


class TransportInScope:
    """For uvicorn's HTTP protocols: every request's scope carries the connection's transport
    (`app.frames.request_transport`), so an SSE response can bound its socket's send buffer
    and abort a stuck reader, as the WebSocket side does."""

    app: Any
    transport: Transport

    def connection_made(self, transport: BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._inner_app = self.app
        self.app = self._app_with_transport  # uvicorn calls `self.app` for each request

    async def _app_with_transport(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        extensions: dict[str, Any] = cast(dict[str, Any], scope).setdefault("extensions", {})
        extensions[TRANSPORT_EXTENSION] = {"transport": self.transport}
        await self._inner_app(scope, receive, send)


# A request's head is read whole before anything else happens, so it is bounded: past these,
# the client gets 414 or 431 and the connection closes, before any body is read.
MAX_URL_BYTES = 8 * 1024  # the request target (path and query): longer is 414
MAX_HEADER_BYTES = 16 * 1024  # the headers, names and values together: more is 431
# httptools gathers an unfinished header inside itself (no callback until it ends), so bytes are
# also counted as they arrive: a head this long without its end is 431 too.
_MAX_HEAD_BYTES = MAX_URL_BYTES + MAX_HEADER_BYTES
_PROBE_PATH = b"/healthz"  # answered at the connection cap too (see `_over_cap`)
_LINGER_SECONDS = 2.0  # a refused connection is read (and discarded) this long, then closed
_CAP_LOG_SECONDS = 10.0  # one log line per this long while requests are refused at the cap


class _Refused(Exception):
    """Raised from a parser callback once the request was answered: stops the parser."""


class PricefeedHTTPProtocol(TransportInScope, HttpToolsProtocol):
    """uvicorn's httptools protocol (what its `auto` picks here), with the transport in scope,
    and limits on what a client can hold before its request reaches the app:

    - a request head (request line and headers) longer than the limits above is answered 414
      or 431 while it is being read (httptools itself has no limit: one never-finished 512 MB
      header once grew the process to ~1 GB);
    - a head not complete `header_timeout` seconds after the connection was made (or after the
      first byte of a keep-alive connection's next request) is answered 408, and a connection
      that sent nothing at all by then is closed: idle and half-finished sockets do not stay;
    - past `max_connections` open connections on this instance, a request (a WebSocket
      upgrade too) is answered 503, except `GET /healthz`: the instance is alive, and a
      probe that failed here would restart it and drop every stream. `/readyz` is refused,
      so a load balancer sends new clients elsewhere.

    Each answer is a small JSON body `{"detail", "code"}` with `Connection: close`. The cost
    per connection is a counter and a timer; nothing is done per body byte."""

    header_timeout = 10.0  # WS_HANDSHAKE_TIMEOUT_SECONDS
    max_connections: int | None = None  # MAX_OPEN_CONNECTIONS
    _cap_logged_at = float("-inf")  # the last cap log line, for all connections
    _cap_refused = 0  # requests refused at the cap since that line

    @classmethod
    def configure(cls, *, header_timeout: float, max_connections: int | None) -> None:
        cls.header_timeout = header_timeout
        cls.max_connections = max_connections

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limit_concurrency = None  # uvicorn's own cap: replaced by `_over_cap`
        self._head_bytes = -1  # bytes of the current head, from its second read on; -1: none
        self._head_began = False  # a head began in the read being parsed
        self._header_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._answered = False

    def connection_made(self, transport: BaseTransport) -> None:
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """uvicorn's, which also counts the bytes of an unfinished head, and stops at once
        (reading nothing more) when a callback answered the request."""
        if self._answered:
            return  # a refused connection's remaining bytes are not parsed
        self._unset_keepalive_if_required()
        self._head_began = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if not self._answered:  # else a callback raised `_Refused`: answered already
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._head_bytes >= 0 and not self._head_began:
            # Only reads after the head's first: a read of pipelined requests never counts a
            # neighbour's bytes, and the head's first read is bounded by the socket's.
            self._head_bytes += len(data)
            if self._head_bytes > _MAX_HEAD_BYTES:
                self._answer(431, "headers_too_large", "request headers too large")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = self._header_bytes = 0
        self._head_began = True
        if self._head_timer is None:  # a keep-alive connection's next request
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def on_url(self, url: bytes) -> None:
        super().on_url(url)  # called for each read's part of it, so this sees a long one grow
        if len(self.url) > MAX_URL_BYTES:
            self._refuse(414, "uri_too_long", "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > MAX_HEADER_BYTES:
            self._refuse(431, "headers_too_large", "request headers too large")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._stop_head_timer()
        self._head_bytes = -1
        if self._over_cap():
            self._refuse(503, "over_capacity", "too many connections, retry shortly")
        super().on_headers_complete()

    def _over_cap(self) -> bool:
        cap = self.max_connections
        if cap is None or len(self.connections) <= cap:  # this connection is one of them
            return False
        if self.url.partition(b"?")[0] == _PROBE_PATH:
            return False
        cls = type(self)
        cls._cap_refused += 1
        now = self.loop.time()
        if now - cls._cap_logged_at >= _CAP_LOG_SECONDS:
            logger.warning(
                "%d open connections, MAX_OPEN_CONNECTIONS is %d: refused %d request(s) with "
                "503 (only /healthz is answered until connections close)",
                len(self.connections),
                cap,
                cls._cap_refused,
            )
            cls._cap_logged_at, cls._cap_refused = now, 0
        return True

    def _responding(self) -> bool:
        """A response is under way (the next request's head came early: pipelined)."""
        return self.cycle is not None and not self.cycle.response_complete

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._answered or self.transport.is_closing():
            return
        if self._responding():  # a stream, say: its client is not late, the head waits
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)
            return
        if self._head_bytes < 0:
            self._answered = True  # nothing was sent: no request to answer
            self.transport.close()
            return
        self._answer(408, "request_timeout", "request headers not complete in time")

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _refuse(self, status: int, code: str, detail: str) -> None:
        """Answer from a parser callback, and stop the parser there."""
        self._answer(status, code, detail)
        raise _Refused

    def _answer(self, status: int, code: str, detail: str) -> None:
        """`status` with a JSON body, then close: nothing more is parsed on this connection."""
        self._answered = True
        self._stop_head_timer()
        transport = self.transport
        if self._responding():  # no answer into the middle of another one: just close
            transport.close()
            return
        body = json.dumps({"detail": detail, "code": code}).encode()
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(body),
                b"connection: close\r\n",
                b"retry-after: 1\r\n" if status == 503 else b"",
                b"\r\n",
                body,
            ]
        )
        transport.write(b"".join(content))
        self.logger.debug("%s answered %d (%s)", self.client, status, code)
        if not transport.can_write_eof():
            transport.close()
            return
        # A close with unread bytes in the socket sends a reset, which may destroy the answer
        # in the client's buffers before it read it: end the sending side only, discard what
        # still comes in (`data_received`), and close after a short while.
        transport.write_eof()
        self._head_timer = self.loop.call_later(_LINGER_SECONDS, transport.close)
