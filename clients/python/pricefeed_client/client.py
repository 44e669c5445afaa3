"""`PricefeedClient`: REST snapshots, history and candles, and `watch` for live ticks.

    async with PricefeedClient("http://127.0.0.1:8000", client_id="demo",
                               client_secret="demo-secret") as feed:
        print((await feed.latest("AAPL")).price)
        async for tick in feed.watch(["AAPL", "BTC-USD"]):
            print(tick.symbol, tick.seq, tick.price)

Arguments left out come from `PRICEFEED_URL` (default http://127.0.0.1:8000),
`PRICEFEED_CLIENT_ID` and `PRICEFEED_CLIENT_SECRET` (default: the service's dev demo client).
Not thread-safe: one event loop per client (`SyncPricefeedClient` runs one for you)."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal
from urllib.parse import quote

import httpx

from pricefeed_client.errors import ApiError, ProtocolError
from pricefeed_client.events import StreamEvent
from pricefeed_client.models import Candle, Symbol, Tick, as_millis
from pricefeed_client.stream import Watch, log_event
from pricefeed_client.tokens import AccessToken, TokenKeeper, TokenProvider

DEFAULT_URL = "http://127.0.0.1:8000"
DEMO_CLIENT_ID, DEMO_CLIENT_SECRET = "demo", "demo-secret"
HISTORY_PAGE = 1000  # the most one history answer holds
Interval = Literal["1m", "5m", "1h", "1d"]


class PricefeedClient:
    """REST and streams with one set of credentials (or a `token_provider` of your own:
    an async callable returning an `AccessToken`, called again before each expiry).

    `receive_buffer` (bytes) bounds the socket's receive buffer: a consumer that falls behind
    then gets conflated prices (the latest of each symbol, reported as `Gap` events) sooner,
    rather than old ones from a deep kernel buffer."""

    def __init__(
        self,
        url: str | None = None,
        *,
        client_id: str | None = None,
        client_secret: str | None = None,
        token_provider: TokenProvider | None = None,
        timeout: float = 10.0,
        receive_buffer: int | None = None,
    ) -> None:
        env = os.environ
        self.url = (url or env.get("PRICEFEED_URL") or DEFAULT_URL).rstrip("/")
        self.client_id = client_id or env.get("PRICEFEED_CLIENT_ID") or DEMO_CLIENT_ID
        self._secret = client_secret or env.get("PRICEFEED_CLIENT_SECRET") or DEMO_CLIENT_SECRET
        self._timeout = timeout
        self._receive_buffer = receive_buffer
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout)
        self._tokens = TokenKeeper(token_provider or self.fetch_token)
        # Open watches, closed with the client: a loop left with `break` drops its generator
        # unclosed, and only a task the garbage collector schedules would close its connection.
        self._watches: set[AsyncGenerator[Tick | StreamEvent, None]] = set()

    async def __aenter__(self) -> PricefeedClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every watch still open, then the HTTP connections."""
        for watch in list(self._watches):
            await watch.aclose()
        await self._http.aclose()

    # ------------------------------------------------------------------ auth

    async def fetch_token(self) -> AccessToken:
        """A new access token for the client credentials."""
        form = {
            "grant_type": "client_credentials",
            "client_id": self.client_id,
            "client_secret": self._secret,
        }
        response = await self._http.post("/v1/auth/token", data=form)
        body = _object(_json(response))
        token, expires_in = body.get("access_token"), body.get("expires_in")
        if not isinstance(token, str) or not isinstance(expires_in, int | float):
            raise ProtocolError("the token endpoint answered without a token or its lifetime")
        return AccessToken(token, time.time() + float(expires_in))

    async def _read(self, path: str, params: Mapping[str, str | int] | None = None) -> Any:
        return _json(await self._get(path, params))

    async def _get(self, path: str, params: Mapping[str, str | int] | None) -> httpx.Response:
        response = await self._http.get(
            path, params=params, headers=_bearer(await self._tokens.current())
        )
        if response.status_code == 401:  # revoked, or expired early (clock skew): once more
            self._tokens.forget()
            response = await self._http.get(
                path, params=params, headers=_bearer(await self._tokens.current())
            )
        return response

    # ------------------------------------------------------------------ REST

    async def symbols(self) -> list[Symbol]:
        """Every instrument the service quotes, and whether these credentials may read it."""
        return [Symbol.from_json(_object(s)) for s in _array(await self._read("/v1/symbols"))]

    async def latest(self, symbol: str) -> Tick:
        """The latest tick of `symbol`."""
        return Tick.from_json(_object(await self._read(_prices(symbol))))

    async def prices(self, symbols: Sequence[str]) -> list[Tick]:
        """The latest tick of each symbol, in the order asked (one with no tick yet: left out)."""
        body = await self._read("/v1/prices", {"symbols": ",".join(symbols)})
        return [Tick.from_json(_object(t)) for t in _array(body)]

    async def history(
        self,
        symbol: str,
        *,
        since: int | None = None,
        start: datetime | int | None = None,
        end: datetime | int | None = None,
        limit: int = 100,
    ) -> list[Tick]:
        """Past ticks, oldest first. `since`: up to `limit` ticks with a greater seq.
        `start`/`end` (datetimes, or epoch ms): every tick with `start <= ts < end`, fetched
        `limit` at a time through the `Link: rel="next"` pages. Neither: the newest `limit`."""
        return [
            t
            async for t in self.iter_history(symbol, since=since, start=start, end=end, limit=limit)
        ]

    async def iter_history(
        self,
        symbol: str,
        *,
        since: int | None = None,
        start: datetime | int | None = None,
        end: datetime | int | None = None,
        limit: int = 100,
    ) -> AsyncGenerator[Tick, None]:
        """`history`, a page at a time: for a long range, without holding all of it."""
        params: dict[str, str | int] = {"limit": limit}
        if since is not None:
            params["since"] = since
        if start is not None:
            params["start"] = as_millis(start)
        if end is not None:
            params["end"] = as_millis(end)
        path: str | None = _prices(symbol) + "/history"
        while path is not None:
            response = await self._get(path, params)
            for item in _array(_json(response)):
                yield Tick.from_json(_object(item))
            # Only a time range pages: the next page's URL carries every parameter itself.
            following = response.links.get("next", {}).get("url")
            path, params = (following, {}) if following and start is not None else (None, {})

    async def candles(
        self,
        symbol: str,
        *,
        interval: Interval = "1m",
        start: datetime | int | None = None,
        end: datetime | int | None = None,
        limit: int = 100,
    ) -> list[Candle]:
        """OHLCV candles, oldest first; the last one may still be forming."""
        params: dict[str, str | int] = {"interval": interval, "limit": limit}
        if start is not None:
            params["start"] = as_millis(start)
        if end is not None:
            params["end"] = as_millis(end)
        body = await self._read(_prices(symbol) + "/candles", params)
        return [Candle.from_json(_object(c)) for c in _array(body)]

    # ------------------------------------------------------------------ streams

    def watch_events(
        self, symbols: Sequence[str], *, refill: bool = True
    ) -> AsyncGenerator[Tick | StreamEvent, None]:
        """Ticks of `symbols` (each once, in `seq` order per symbol, across reconnects) and,
        in order with them, what happened to the stream (pricefeed_client.events). Runs until
        you stop iterating; raises StreamRefused for what reconnecting cannot fix, ApiError
        for credentials the token endpoint refuses. `refill=False`: gaps are reported but
        not filled from /history."""
        watch = Watch(
            url="ws" + self.url.removeprefix("http") + "/v1/ws",
            symbols=symbols,
            tokens=self._tokens,
            read_history=self._history_after if refill else None,
            open_timeout=self._timeout,
            receive_buffer=self._receive_buffer,
        )
        stream = watch.run()
        self._watches = {w for w in self._watches if getattr(w, "ag_frame", None) is not None}
        self._watches.add(stream)
        return stream

    async def watch(
        self,
        symbols: Sequence[str],
        *,
        refill: bool = True,
        on_event: Callable[[StreamEvent], object] | None = None,
    ) -> AsyncGenerator[Tick, None]:
        """The ticks of `watch_events`; each event goes to `on_event`, or without it to the
        `pricefeed_client` logger (a warning for gaps, resets and drops)."""
        async for item in self.watch_events(symbols, refill=refill):
            if isinstance(item, Tick):
                yield item
            elif on_event is not None:
                on_event(item)
            else:
                log_event(item)

    async def _history_after(self, symbol: str, seq: int, limit: int) -> list[Tick]:
        return await self.history(symbol, since=seq, limit=min(limit, HISTORY_PAGE))


def _prices(symbol: str) -> str:
    return f"/v1/prices/{quote(symbol, safe='')}"


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _json(response: httpx.Response) -> Any:
    """The JSON body of a 2xx answer; ApiError for any other."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.is_success:
        if body is None:
            raise ProtocolError(f"HTTP {response.status_code} without a JSON body")
        return body
    detail = body.get("detail") if isinstance(body, dict) else None
    code = body.get("code") if isinstance(body, dict) else None
    raise ApiError(
        response.status_code,
        str(detail) if detail else response.reason_phrase or "no detail",
        str(code) if code else "",
    )


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _array(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ProtocolError(f"expected a JSON array, got {type(value).__name__}")
    return value
