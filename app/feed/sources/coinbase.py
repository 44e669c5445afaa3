"""FEED_SOURCE=coinbase: the Coinbase Exchange public WebSocket feed, `ticker` and `heartbeat`
channels, for the active instruments whose asset class is `crypto` (our symbol is the
product id: BTC-USD).

Built from the feed's public documentation (docs/coinbase.md says what each page fixes):
- https://docs.cdp.coinbase.com/exchange/websocket-feed/overview: JSON objects with a `type`;
  a `subscribe` within 5 s of connecting (`{"type": "subscribe", "product_ids": [...],
  "channels": ["ticker", "heartbeat"]}`), answered by `subscriptions`; `unsubscribe` has the
  same shape; failures come as `{"type": "error", "message": ..., "reason": ...}`; new message
  types may appear and are to be ignored; per-product sequence numbers, where a jump means
  dropped messages and a lower one an out-of-order message.
- https://docs.cdp.coinbase.com/exchange/websocket-feed/channels: `ticker` (a match, with
  `sequence`, `product_id`, `price`, `best_bid`, `best_ask`, `volume_24h`, `last_size`, `side`,
  `time`, `trade_id`, ...) and `heartbeat` (once a second per product: `sequence`,
  `last_trade_id`, `product_id`, `time`).
- https://docs.cdp.coinbase.com/exchange/websocket-feed/rate-limits: 8 connection requests a
  second per IP (bursts of 20), 100 client messages a second: the reconnect backoff starts at
  half a second and we send one message per catalog change.

One connection at a time (`_Session`); whatever ends it (closed, failed, an `error`, silent
for FEED_STALE_SECONDS) leads to a reconnect after a jittered, growing delay, and a fresh
subscribe. Nothing the upstream sends can raise out of `stream`: a message that cannot become
a quote is counted under a reason (FeedStats.reject) and skipped.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from app.backoff import Backoff
from app.feed.quotes import QuoteError
from app.feed.sources import Instruments, Quote, SourceNotReady
from app.feed.sources.coinbase_ticker import ticker_quote
from app.instruments.repository import InstrumentInfo

if TYPE_CHECKING:
    from app.config import Settings
    from app.feed.stats import FeedStats

logger = logging.getLogger(__name__)

CHANNELS = ("ticker", "heartbeat")
ASSET_CLASS = "crypto"
# A ticker is well under 1 KiB; anything near this is not a message we asked for.
MAX_MESSAGE_BYTES = 1 << 20
OPEN_TIMEOUT_SECONDS = 10.0
PING_INTERVAL_SECONDS = 20.0  # the TCP path is checked even between heartbeats
CLOSE_TIMEOUT_SECONDS = 2.0
# How often a quiet connection looks at the catalog (a busy one looks after every batch).
CATALOG_POLL_SECONDS = 1.0
# Frames read ahead of the producer. Past this, reading pauses and the upstream sees a slow
# consumer (and may drop us: ErrSlowConsume), rather than this process buffering without end.
INBOX_FRAMES = 4096
BACKOFF_BASE_SECONDS = 0.5
BACKOFF_CAP_SECONDS = 30.0


def create(settings: Settings, stats: FeedStats) -> CoinbaseSource:
    url = settings.feed_upstream_url
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise SourceNotReady(
            f"FEED_UPSTREAM_URL must be a ws:// or wss:// URL with a host, not {url!r}"
        )
    return CoinbaseSource(url=url, stale_seconds=settings.feed_stale_seconds, stats=stats)


class UpstreamLost(Exception):
    """The connection is over; `reason` is the one line the reconnect log shows."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CoinbaseSource:
    """Quotes from the Coinbase Exchange `ticker` channel, reconnecting for ever."""

    name = "coinbase"

    def __init__(
        self,
        *,
        url: str,
        stale_seconds: float,
        stats: FeedStats,
        backoff: Backoff | None = None,
    ) -> None:
        self._url = url
        self._stale_seconds = stale_seconds
        self._stats = stats
        self._backoff = backoff or Backoff(base=BACKOFF_BASE_SECONDS, cap=BACKOFF_CAP_SECONDS)
        # Products the upstream said are not valid: left out of every subscribe (one would
        # fail them all) until the instrument leaves the catalog and comes back.
        self._refused: set[str] = set()

    def wanted(self, instruments: Instruments) -> list[str]:
        """The product ids to subscribe to now."""
        crypto = {i.symbol for i in instruments if i.asset_class == ASSET_CLASS}
        self._refused &= crypto
        return sorted(crypto - self._refused)

    async def stream(
        self, instruments: Instruments, start_prices: dict[str, Decimal]
    ) -> AsyncIterator[list[Quote]]:
        # start_prices: a live feed says where the price is; nothing to continue from.
        while True:
            await self._wait_for_products(instruments)
            delivered = False
            try:
                async with _Session(
                    source=self,
                    instruments=instruments,
                    url=self._url,
                    stale_seconds=self._stale_seconds,
                    stats=self._stats,
                ) as session:
                    while (batch := await session.next_batch()) is not None:
                        if batch:
                            delivered = True
                            yield batch
                continue  # no crypto instrument left: closed on purpose, nothing to retry
            except UpstreamLost as lost:
                reason = lost.reason
            if delivered:
                self._backoff.reset()
            delay = self._backoff.next_delay()
            logger.warning(
                "coinbase: %s; reconnecting in %.2fs (attempt %d)",
                reason,
                delay,
                self._backoff.attempt,
            )
            await asyncio.sleep(delay)

    async def _wait_for_products(self, instruments: Instruments) -> None:
        if self.wanted(instruments):
            return
        logger.warning("coinbase: no active %s instrument to subscribe to; waiting", ASSET_CLASS)
        version = instruments.version
        while True:
            await asyncio.sleep(CATALOG_POLL_SECONDS)
            if instruments.version != version:
                version = instruments.version
                if self.wanted(instruments):
                    return

    def refuse(self, reason: str, subscribed: set[str]) -> None:
        """An `error` naming products we asked for: leave them out from now on."""
        named = sorted(
            p for p in subscribed if re.search(rf"(?<![\w-]){re.escape(p)}(?![\w-])", reason)
        )
        if named:
            self._refused.update(named)
            logger.warning(
                "coinbase: the upstream refused %s (%s); not subscribing to %s until it is "
                "disabled and added again",
                ", ".join(named),
                reason,
                "it" if len(named) == 1 else "them",
            )


@dataclass(frozen=True, slots=True)
class _Closed:
    reason: str


class _Session:
    """One connection: connect, subscribe, read frames into quotes, follow the catalog."""

    def __init__(
        self,
        *,
        source: CoinbaseSource,
        instruments: Instruments,
        url: str,
        stale_seconds: float,
        stats: FeedStats,
    ) -> None:
        self._source = source  # what to subscribe to, and which products it refuses
        self._instruments = instruments
        self._url = url
        self._stale_seconds = stale_seconds
        self._stats = stats
        self._inbox: asyncio.Queue[str | bytes | _Closed] = asyncio.Queue(INBOX_FRAMES)
        self._subscribed: set[str] = set()
        self._version = instruments.version
        self._sequence: dict[str, int] = {}  # per product: reset with every connection
        self._lost: UpstreamLost | None = None  # after the quotes that came before it
        self._conn: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._heard_at = 0.0

    async def __aenter__(self) -> _Session:
        url = self._url
        try:
            self._conn = await connect(
                url,
                open_timeout=OPEN_TIMEOUT_SECONDS,
                ping_interval=PING_INTERVAL_SECONDS,
                ping_timeout=PING_INTERVAL_SECONDS,
                close_timeout=CLOSE_TIMEOUT_SECONDS,
                max_size=MAX_MESSAGE_BYTES,
                # Plain frames: a few products' tickers are light, and inflating each one
                # would cost the producer's loop more than the bytes it saves.
                compression=None,
            )
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise UpstreamLost(f"cannot connect to {url} ({_describe(exc)})") from None
        self._heard_at = asyncio.get_running_loop().time()
        self._reader = asyncio.create_task(self._read(self._conn), name="coinbase-reader")
        logger.info("coinbase: connected to %s", url)
        try:
            await self._follow_catalog()
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._conn is not None:
            await self._conn.close()

    async def next_batch(self) -> list[Quote] | None:
        """The quotes of the frames that arrived together ([] when none made a quote); None
        when no instrument is left to follow. UpstreamLost when the connection is over."""
        loop = asyncio.get_running_loop()
        while True:
            if self._lost is not None:
                raise self._lost
            if not self._subscribed:
                return None
            if self._instruments.version != self._version and not await self._follow_catalog():
                return None
            if self._inbox.empty():
                silent_for = loop.time() - self._heard_at
                if silent_for >= self._stale_seconds:
                    raise UpstreamLost(f"upstream silent for {silent_for:.1f}s")
                try:
                    async with asyncio.timeout(
                        min(self._stale_seconds - silent_for, CATALOG_POLL_SECONDS)
                    ):
                        frames = [await self._inbox.get()]
                except TimeoutError:
                    continue
            else:
                frames = [self._inbox.get_nowait()]
            while not self._inbox.empty():
                frames.append(self._inbox.get_nowait())
            return self._quotes(frames)

    def _quotes(self, frames: list[str | bytes | _Closed]) -> list[Quote]:
        quotes: list[Quote] = []
        for frame in frames:
            try:
                if isinstance(frame, _Closed):
                    raise UpstreamLost(frame.reason)
                quote = self._read_message(frame)
            except UpstreamLost as lost:
                if not quotes:
                    raise
                self._lost = lost  # the quotes before it still go out
                break
            if quote is not None:
                quotes.append(quote)
        return quotes

    async def _read(self, conn: ClientConnection) -> None:
        loop = asyncio.get_running_loop()
        try:
            async for frame in conn:
                # When it came, not when the producer took it: a producer held up (a slow
                # store) must not make a talking upstream look silent.
                self._heard_at = loop.time()
                await self._inbox.put(frame)
            reason = f"upstream closed the connection (code {conn.close_code})"
        except ConnectionClosed as exc:
            reason = f"connection lost ({_describe(exc)})"
        await self._inbox.put(_Closed(reason))

    async def _follow_catalog(self) -> bool:
        """Subscribe to what the catalog added and unsubscribe from what it removed; False
        when nothing is left to follow."""
        self._version = self._instruments.version
        wanted = set(self._source.wanted(self._instruments))
        added, removed = sorted(wanted - self._subscribed), sorted(self._subscribed - wanted)
        if removed:
            await self._send("unsubscribe", removed)
            for product in removed:
                self._sequence.pop(product, None)
        if not wanted:
            logger.info("coinbase: no %s instrument left; closing the connection", ASSET_CLASS)
            return False
        if added:
            await self._send("subscribe", added)
        self._subscribed = wanted
        return True

    async def _send(self, kind: str, products: list[str]) -> None:
        assert self._conn is not None
        message = {"type": kind, "product_ids": products, "channels": list(CHANNELS)}
        try:
            await self._conn.send(orjson.dumps(message).decode())
        except ConnectionClosed as exc:
            raise UpstreamLost(f"connection lost while sending {kind} ({_describe(exc)})") from None
        logger.info("coinbase: %s %s", kind, ", ".join(products))

    # ------------------------------------------------------------ messages

    def _read_message(self, frame: str | bytes) -> Quote | None:
        try:
            message = orjson.loads(frame)
        except orjson.JSONDecodeError:
            self._stats.reject("malformed", f"not JSON: {_excerpt(frame)}")
            return None
        if not isinstance(message, dict):
            self._stats.reject("malformed", f"not a JSON object: {_excerpt(frame)}")
            return None
        kind = message.get("type")
        if kind == "ticker":
            return self._ticker(message)
        if kind == "heartbeat":
            self._in_sequence(message)
            return None
        if kind == "subscriptions":
            self._confirmed(message)
            return None
        if kind == "error":
            text = f"{_text(message.get('message'))} ({_text(message.get('reason'))})"
            self._stats.reject("upstream_error", text)
            self._source.refuse(_text(message.get("reason")), self._subscribed)
            raise UpstreamLost(f"upstream error: {text}")
        if not isinstance(kind, str):
            self._stats.reject("malformed", f"no message type: {_excerpt(frame)}")
        # Another string: a type added since (the docs ask clients to ignore those).
        return None

    def _ticker(self, message: dict[str, Any]) -> Quote | None:
        instrument = self._in_sequence(message)
        if instrument is None:
            return None
        try:
            return ticker_quote(message, instrument)
        except QuoteError as exc:
            self._stats.reject(exc.reason, f"{instrument.symbol}: {exc}")
            return None

    def _in_sequence(self, message: dict[str, Any]) -> InstrumentInfo | None:
        """The instrument of a ticker or heartbeat whose sequence moves its product forward;
        None (counted) for one that does not."""
        kind, product, sequence = (
            message["type"],
            message.get("product_id"),
            message.get("sequence"),
        )
        if not isinstance(product, str):
            self._stats.reject("malformed", f"{kind} without a product_id")
            return None
        instrument = self._instruments.get(product)
        if instrument is None or product not in self._subscribed:
            self._stats.reject("unknown_symbol", f"{kind} for {product[:32]!r}, not subscribed")
            return None
        if not isinstance(sequence, int) or isinstance(sequence, bool) or sequence < 0:
            self._stats.reject("malformed", f"{kind} for {product} without an integer sequence")
            return None
        last = self._sequence.get(product)
        # A heartbeat repeats the product's sequence while nothing happens: equal is in order.
        if last is not None and (sequence < last or (sequence == last and kind == "ticker")):
            self._stats.reject("stale_sequence", f"{kind} {product} {sequence} after {last}")
            return None
        if last is not None and sequence > last + 1:
            self._stats.upstream_gap(product, sequence - last - 1)
        self._sequence[product] = sequence
        return instrument

    def _confirmed(self, message: dict[str, Any]) -> None:
        channels = message.get("channels")
        described = []
        if isinstance(channels, list):
            for channel in channels:
                if isinstance(channel, dict):
                    products = channel.get("product_ids")
                    listed = ", ".join(map(str, products)) if isinstance(products, list) else ""
                    described.append(f"{_text(channel.get('name'))} [{listed}]")
        logger.info("coinbase: the upstream confirms %s", "; ".join(described) or "nothing")


def _text(raw: object) -> str:
    return (raw if isinstance(raw, str) else repr(raw))[:200]


def _excerpt(frame: str | bytes) -> str:
    return repr(frame[:80])


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
