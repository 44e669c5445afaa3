"""The Python client: `python -m app.client latest|history|watch …`, or `PricefeedClient`.

Env: `PRICEFEED_URL` (default http://127.0.0.1:8000), `PRICEFEED_CLIENT_ID`,
`PRICEFEED_CLIENT_SECRET` (default: the dev demo client). `watch` yields each tick of each
symbol once, in `seq` order, across reconnects (it resumes with `since`) and conflation (it
refills a `seq` jump from the history route); a gap beyond the retention window, and every
reconnect, is logged on the `app.client` logger. An instrument disabled while watched is
dropped (logged) and the others watched on.

    PricefeedError
    ├── ApiError        a REST answer other than 2xx (`status`, `detail`)
    └── StreamRefused   a stream close that reconnecting cannot fix (`code`, a CloseCode:
                        NOT_ENTITLED, UNKNOWN_SYMBOL, POLICY)

Reconnects wait 0.5 s doubling to 15 s, jittered (app/backoff.py), and start over once a
connection delivered a tick.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import quote

import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from app.backoff import Backoff
from app.errors import CloseCode

Tick = dict[str, Any]

logger = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8000"
DEMO_CLIENT_ID, DEMO_CLIENT_SECRET = "demo", "demo-secret"
BACKOFF_FIRST_SECONDS, BACKOFF_MAX_SECONDS = 0.5, 15.0
REFRESH_AT = 0.8  # renew the token at this fraction of its lifetime
RENEW_RETRY_SECONDS = 5.0
HISTORY_LIMIT = 1000  # the most the history route returns at once
_FINAL_CLOSE_CODES = frozenset({CloseCode.NOT_ENTITLED, CloseCode.UNKNOWN_SYMBOL})  # no retry helps
_NEW_TOKEN_CLOSE_CODES = frozenset({CloseCode.BAD_TOKEN, CloseCode.TOKEN_EXPIRED})
_REFUSED_ERRORS = {
    "unknown_symbol": CloseCode.UNKNOWN_SYMBOL,
    "too_many_subscriptions": CloseCode.POLICY,
}
_NO_CLOSE_FRAME = 1006  # RFC 6455: the connection dropped without a close; never sent


class PricefeedError(Exception):
    """Something the service refused."""


class ApiError(PricefeedError):
    def __init__(self, status: int, detail: str) -> None:
        self.status, self.detail = status, detail
        super().__init__(f"HTTP {status} {httpx.codes.get_reason_phrase(status)}: {detail}")


class StreamRefused(PricefeedError):
    def __init__(self, code: CloseCode, reason: str) -> None:
        self.code, self.reason = code, reason
        super().__init__(f"stream closed with {code}: {reason or 'no reason given'}")


class _Retry(Exception):
    """The stream should be reopened (after a backoff)."""


def _raise_for_status(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        detail = str(orjson.loads(response.content).get("detail", ""))
    except (orjson.JSONDecodeError, AttributeError):
        detail = response.text[:200]
    raise ApiError(response.status_code, detail or "no detail")


def _as_tick(value: Any) -> Tick:
    if not isinstance(value, dict):
        raise PricefeedError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _as_ticks(value: Any) -> list[Tick]:
    if not isinstance(value, list):
        raise PricefeedError(f"expected a JSON array, got {type(value).__name__}")
    return [_as_tick(item) for item in value]


class PricefeedClient:
    """REST and WebSocket access with one set of client credentials. Not thread-safe."""

    def __init__(
        self,
        base_url: str | None = None,
        client_id: str | None = None,
        client_secret: str | None = None,
        *,
        timeout: float = 10.0,
    ) -> None:
        env = os.environ
        self.base_url = (base_url or env.get("PRICEFEED_URL") or DEFAULT_URL).rstrip("/")
        self.client_id = client_id or env.get("PRICEFEED_CLIENT_ID") or DEMO_CLIENT_ID
        self._secret = client_secret or env.get("PRICEFEED_CLIENT_SECRET") or DEMO_CLIENT_SECRET
        self._timeout = timeout
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout)
        self._token: str | None = None
        self._renew_at = 0.0  # time.monotonic() when the token should be replaced

    async def __aenter__(self) -> PricefeedClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def fetch_token(self) -> str:
        """A new access token for the client credentials (kept for later calls)."""
        form = {
            "grant_type": "client_credentials",
            "client_id": self.client_id,
            "client_secret": self._secret,
        }
        response = await self._http.post("/v1/auth/token", data=form)
        _raise_for_status(response)
        body = _as_tick(orjson.loads(response.content))
        self._token = str(body["access_token"])
        self._renew_at = time.monotonic() + REFRESH_AT * float(body["expires_in"])
        return self._token

    async def _current_token(self) -> str:
        if self._token is None or time.monotonic() >= self._renew_at:
            return await self.fetch_token()
        return self._token

    async def _read_json(self, path: str, params: dict[str, str | int] | None = None) -> Any:
        token = await self._current_token()
        response = await self._http.get(path, params=params, headers=_bearer(token))
        if response.status_code == 401:  # revoked or expired early (clock skew): once more
            response = await self._http.get(
                path, params=params, headers=_bearer(await self.fetch_token())
            )
        _raise_for_status(response)
        return orjson.loads(response.content)

    async def read_latest_price(self, symbol: str) -> Tick:
        return _as_tick(await self._read_json(f"/v1/prices/{quote(symbol, safe='')}"))

    async def read_latest_prices(self, symbols: Sequence[str]) -> list[Tick]:
        return _as_ticks(await self._read_json("/v1/prices", {"symbols": ",".join(symbols)}))

    async def read_history(
        self, symbol: str, since: int | None = None, limit: int = 100
    ) -> list[Tick]:
        """Retained ticks, oldest first: those with `seq > since`, or the newest `limit`."""
        params: dict[str, str | int] = {"limit": limit}
        if since is not None:
            params["since"] = since
        path = f"/v1/prices/{quote(symbol, safe='')}/history"
        return _as_ticks(await self._read_json(path, params))

    async def watch(self, symbols: Sequence[str], *, refill: bool = True) -> AsyncIterator[Tick]:
        """Ticks and snapshots of `symbols`, forever. Reconnects by itself; raises
        StreamRefused for a close that reconnecting cannot fix, ApiError for bad credentials."""
        wanted = list(dict.fromkeys(s.strip().upper() for s in symbols))
        ws_url = "ws" + self.base_url.removeprefix("http") + "/v1/ws"
        last: dict[str, int] = {}  # symbol → highest seq yielded
        backoff = Backoff(base=BACKOFF_FIRST_SECONDS, cap=BACKOFF_MAX_SECONDS)
        while True:
            try:
                token = await self._current_token()
                async with connect(
                    ws_url, additional_headers=_bearer(token), open_timeout=self._timeout
                ) as ws:
                    since = {s: last[s] for s in wanted if s in last}
                    await ws.send(
                        orjson.dumps(
                            {"op": "subscribe", "symbols": wanted, "since": since, "batch": True}
                        ).decode()
                    )
                    if since:
                        logger.info("reconnected; resuming from %s", since)
                    while True:
                        for frame in await self._receive(ws):
                            if frame.get("type") not in ("tick", "snapshot"):
                                gone = _withdrawn(frame)
                                if gone is None:
                                    _check_control(frame)
                                else:  # the server watches the rest, and so does this
                                    wanted = _watch_the_rest(wanted, gone, frame)
                                continue
                            if refill:
                                for old in await self._refill(frame, last):
                                    yield old
                            if _admit(frame, last):
                                backoff.reset()  # this connection worked
                                yield frame
            except ConnectionClosed as exc:
                code, why = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (_NO_CLOSE_FRAME, "")
                if code in _FINAL_CLOSE_CODES:
                    raise StreamRefused(CloseCode(code), why) from None
                if code in _NEW_TOKEN_CLOSE_CODES:
                    self._token = None
                reason = f"closed {code}" + (f" ({why})" if why else "")
            except ApiError as exc:  # from the token endpoint
                if exc.status < 500:
                    raise
                reason = str(exc)
            except (OSError, InvalidHandshake, httpx.TransportError, _Retry) as exc:
                reason = str(exc) or type(exc).__name__
            delay = backoff.next_delay()
            logger.warning("reconnecting in %.1fs: %s", delay, reason)
            await asyncio.sleep(delay)

    async def _receive(self, ws: ClientConnection) -> list[Tick]:
        """The objects of the next frame (a batch frame holds several), renewing the token
        on the open connection when it is due."""
        while True:
            wait = self._renew_at - time.monotonic()
            if wait <= 0:
                await self._renew_on(ws)
                continue
            try:
                async with asyncio.timeout(wait):
                    data = await ws.recv()  # cancelling recv() loses no message
            except TimeoutError:
                continue
            try:
                body = orjson.loads(data)
            except orjson.JSONDecodeError:
                logger.warning("ignored a frame that is not JSON")
                continue
            items = body if isinstance(body, list) else [body]
            return [item for item in items if isinstance(item, dict)]

    async def _renew_on(self, ws: ClientConnection) -> None:
        try:
            token = await self.fetch_token()
        except (httpx.HTTPError, PricefeedError) as exc:
            # Keep streaming: at expiry the server closes with CloseCode.TOKEN_EXPIRED, and we
            # reconnect then.
            logger.warning(
                "could not renew the token (%s); retrying in %.0fs", exc, RENEW_RETRY_SECONDS
            )
            self._renew_at = time.monotonic() + RENEW_RETRY_SECONDS
            return
        await ws.send(orjson.dumps({"op": "auth", "token": token}).decode())

    async def _refill(self, frame: Tick, last: dict[str, int]) -> list[Tick]:
        """The ticks a `seq` jump skipped (conflation), from the retained history."""
        symbol, seq = frame.get("symbol"), frame.get("seq")
        prev = last.get(symbol) if isinstance(symbol, str) else None
        if prev is None or not isinstance(seq, int) or seq <= prev + 1:
            return []
        if frame.get("reset") is True:  # the service says they are stored nowhere
            return []
        try:
            history = await self.read_history(
                str(symbol), since=prev, limit=min(seq - prev - 1, HISTORY_LIMIT)
            )
        except (httpx.HTTPError, PricefeedError) as exc:
            logger.warning("could not refill %s after seq %d: %s", symbol, prev, exc)
            return []
        return [
            t
            for t in history
            if isinstance(t.get("seq"), int) and t["seq"] < seq and _admit(t, last)
        ]


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _admit(frame: Tick, last: dict[str, int]) -> bool:
    """Whether `frame` is new for its symbol (recording it, and logging any gap)."""
    symbol, seq = frame.get("symbol"), frame.get("seq")
    if not isinstance(symbol, str) or not isinstance(seq, int):
        return False
    prev = last.get(symbol)
    if frame.get("reset") is True and prev is not None and seq != prev + 1:
        # The feed starts afresh here: what lies between is stored nowhere (or seq went back).
        logger.warning(
            "%s: reset at seq %d after %d; the ticks between are lost", symbol, seq, prev
        )
    elif prev is not None and seq <= prev:
        # A snapshot behind what we saw means the service lost its history (a restart of
        # an in-memory store) and answered `since` afresh: follow it rather than go silent.
        if frame.get("type") != "snapshot" or seq == prev:
            return False
        logger.warning("%s: seq went back from %d to %d; the service restarted", symbol, prev, seq)
    elif prev is not None and seq > prev + 1:
        logger.warning(
            "gap: %s seq %d..%d lost (%d ticks)", symbol, prev + 1, seq - 1, seq - prev - 1
        )
    last[symbol] = seq
    return True


def _withdrawn(frame: Tick) -> list[str] | None:
    """The symbols an `unknown_symbol` error names: instruments disabled while watched, which
    the server dropped, going on with the rest. None for any other frame (a subscribe refused
    outright names none)."""
    gone = frame.get("symbols")
    if frame.get("type") != "error" or frame.get("code") != "unknown_symbol":
        return None
    if not isinstance(gone, list):
        return None
    return [str(s) for s in gone]


def _watch_the_rest(wanted: list[str], gone: list[str], frame: Tick) -> list[str]:
    """`wanted` without `gone` (a reconnect no longer asks for them); StreamRefused once
    nothing is left."""
    rest = [s for s in wanted if s not in gone]
    message = str(frame.get("message", ""))
    if not rest:
        raise StreamRefused(CloseCode.UNKNOWN_SYMBOL, message)
    logger.warning("%s; watching %s", message, ", ".join(rest))
    return rest


def _check_control(frame: Tick) -> None:
    """React to a non-price frame: only `error` ones matter."""
    if frame.get("type") != "error":
        return
    code, message = str(frame.get("code")), str(frame.get("message", ""))
    if code in _REFUSED_ERRORS:  # the subscription will never succeed: say so, do not hang
        raise StreamRefused(_REFUSED_ERRORS[code], message)
    if code == "unavailable":
        raise _Retry(f"server: {message}")
    logger.warning("server error %s: %s", code, message)


async def _run(args: argparse.Namespace) -> int:
    async with PricefeedClient() as client:
        if args.command == "latest":
            print(orjson.dumps(await client.read_latest_price(args.symbol)).decode())
        elif args.command == "history":
            for tick in await client.read_history(args.symbol, args.since, args.limit):
                print(orjson.dumps(tick).decode())
        else:
            async for tick in client.watch(args.symbols):
                print(*(tick.get(k) for k in ("symbol", "seq", "price", "ts")), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.client",
        description="pricefeed: latest prices, history, live ticks",
        epilog="Env: PRICEFEED_URL, PRICEFEED_CLIENT_ID, PRICEFEED_CLIENT_SECRET.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    latest = commands.add_parser("latest", help="print the latest tick as JSON")
    latest.add_argument("symbol")
    history = commands.add_parser("history", help="print retained ticks, one JSON per line")
    history.add_argument("symbol")
    history.add_argument("--since", type=int, default=None, help="only ticks with a greater seq")
    history.add_argument("--limit", type=int, default=100)
    watch = commands.add_parser("watch", help="print 'SYMBOL seq price ts' per tick")
    watch.add_argument("symbols", nargs="+", metavar="SYMBOL")
    args = parser.parse_args(argv)

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("pricefeed: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 0
    except ApiError as exc:
        hint = " (check PRICEFEED_CLIENT_ID / PRICEFEED_CLIENT_SECRET)" if exc.status == 401 else ""
        print(f"error: {exc}{hint}", file=sys.stderr)
    except PricefeedError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except (httpx.HTTPError, OSError) as exc:
        print(f"error: cannot reach the service: {exc or type(exc).__name__}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
