"""A local stand-in for the Coinbase Exchange WebSocket feed (wss://ws-feed.exchange.coinbase.com),
speaking the message shapes its public documentation gives (docs/coinbase.md): `subscribe` and
`unsubscribe` answered with `subscriptions`; `ticker` and `heartbeat` with one `sequence` per
product, shared by both channels and across connections, as the exchange numbers them; `error`.

A real `websockets` server on 127.0.0.1. The test drives it: send a ticker (`skip` numbers to
make a gap), a heartbeat, raw garbage or an error; close every connection; tick on its own
(`start_ticking`) and go silent (`silent = True`). It counts connections and keeps every
subscribe/unsubscribe it received, so a test can see a reconnect and a resubscribe.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

CHANNELS = ("ticker", "heartbeat")


class FakeCoinbase:
    def __init__(self, *, valid_products: set[str] | None = None) -> None:
        # None: every product id is valid; else the others get the exchange's error.
        self.valid_products = valid_products
        self.connections = 0
        self.requests: list[dict[str, Any]] = []  # subscribe/unsubscribe, in arrival order
        self.silent = False  # while True, start_ticking's task sends nothing at all
        self._clients: dict[ServerConnection, set[str]] = {}
        self._sequence: dict[str, int] = {}
        self._trade_id = 1000
        self._server: Server | None = None
        self._ticking: asyncio.Task[None] | None = None

    async def __aenter__(self) -> FakeCoinbase:
        self._server = await serve(self._serve, "127.0.0.1", 0, compression=None)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._ticking is not None:
            self._ticking.cancel()
            await asyncio.gather(self._ticking, return_exceptions=True)
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = next(iter(self._server.sockets)).getsockname()[1]
        return f"ws://127.0.0.1:{port}"

    def subscribed(self) -> set[str]:
        """The products some open connection is subscribed to."""
        return set().union(*self._clients.values())

    def subscribes(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r.get("type") == "subscribe"]

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the fake upstream never saw that: {self.requests}")
            await asyncio.sleep(0.01)

    # ------------------------------------------------------------ what the test sends

    def next_sequence(self, product: str, skip: int = 0) -> int:
        self._sequence[product] = self._sequence.get(product, 0) + 1 + skip
        return self._sequence[product]

    def ticker_message(
        self, product: str, price: str = "67250.01", **fields: Any
    ) -> dict[str, Any]:
        """A ticker as the exchange documents it; `fields` replace some (None removes one)."""
        self._trade_id += 1
        message: dict[str, Any] = {
            "type": "ticker",
            "sequence": None,
            "product_id": product,
            "price": price,
            "open_24h": "66100.00",
            "volume_24h": "9756.91661100",
            "low_24h": "65980.12",
            "high_24h": "67420.55",
            "volume_30d": "539862.62714400",
            "best_bid": "67250.00",
            "best_bid_size": "0.02453500",
            "best_ask": "67250.02",
            "best_ask_size": "0.06298200",
            "side": "buy",
            "time": datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "trade_id": self._trade_id,
            "last_size": "0.00026100",
        }
        message.update(fields)
        return {k: v for k, v in message.items() if v is not None}

    async def ticker(
        self, product: str, price: str = "67250.01", *, skip: int = 0, **fields: Any
    ) -> dict[str, Any]:
        """Send a ticker to every connection subscribed to `product`; `skip` sequence numbers
        first (a gap), or give `sequence=` outright (a stale one)."""
        if "sequence" not in fields:
            fields["sequence"] = self.next_sequence(product, skip)
        message = self.ticker_message(product, price, **fields)
        await self._send_subscribed(product, message)
        return message

    async def heartbeat(self, product: str) -> None:
        message = {
            "type": "heartbeat",
            "sequence": self.next_sequence(product),
            "last_trade_id": self._trade_id,
            "product_id": product,
            "time": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        }
        await self._send_subscribed(product, message)

    async def error(self, message: str, reason: str) -> None:
        await self.send_raw(orjson.dumps({"type": "error", "message": message, "reason": reason}))

    async def send_raw(self, frame: str | bytes) -> None:
        """Any frame, as is, to every connection."""
        for conn in list(self._clients):
            with contextlib.suppress(ConnectionClosed):
                await conn.send(frame if isinstance(frame, str) else frame.decode())

    async def close(self, code: int = 1011, reason: str = "going away") -> None:
        """Close every connection, as the exchange does mid-stream now and then."""
        await asyncio.gather(
            *(conn.close(code, reason) for conn in list(self._clients)), return_exceptions=True
        )

    def start_ticking(self, interval: float = 0.05, heartbeat_every: int = 10) -> None:
        """Tick every subscribed product every `interval`, and a heartbeat every
        `heartbeat_every` ticks, until `silent` or the fake closes."""

        async def tick() -> None:
            rounds = 0
            while True:
                await asyncio.sleep(interval)
                if self.silent:
                    continue
                rounds += 1
                for product in sorted(self.subscribed()):
                    await self.ticker(product, _price(product, rounds))
                    if rounds % heartbeat_every == 0:
                        await self.heartbeat(product)

        self._ticking = asyncio.create_task(tick())

    # ------------------------------------------------------------ the server side

    async def _serve(self, conn: ServerConnection) -> None:
        self.connections += 1
        self._clients[conn] = set()
        try:
            async for raw in conn:
                await self._answer(conn, raw)
        except ConnectionClosed:
            pass
        finally:
            del self._clients[conn]

    async def _answer(self, conn: ServerConnection, raw: str | bytes) -> None:
        try:
            request = orjson.loads(raw)
        except orjson.JSONDecodeError:
            await self._refuse(conn, "Malformed JSON", "request is not JSON")
            return
        kind = request.get("type") if isinstance(request, dict) else None
        if kind not in ("subscribe", "unsubscribe"):
            await self._refuse(conn, "Failed to subscribe", f"type {kind!r} is not supported")
            return
        self.requests.append(request)
        products = request.get("product_ids", [])
        valid = self.valid_products
        invalid = [] if valid is None else [p for p in products if p not in valid]
        if invalid:
            await self._refuse(conn, "Failed to subscribe", f"{invalid[0]} is not a valid product")
            return
        if kind == "subscribe":
            self._clients[conn] |= set(products)
        else:
            self._clients[conn] -= set(products)
        current = sorted(self._clients[conn])
        await conn.send(
            orjson.dumps(
                {
                    "type": "subscriptions",
                    "channels": [{"name": name, "product_ids": current} for name in CHANNELS],
                }
            ).decode()
        )

    async def _refuse(self, conn: ServerConnection, message: str, reason: str) -> None:
        await conn.send(
            orjson.dumps({"type": "error", "message": message, "reason": reason}).decode()
        )

    async def _send_subscribed(self, product: str, message: dict[str, Any]) -> None:
        frame = orjson.dumps(message).decode()
        for conn, products in list(self._clients.items()):
            if product in products:
                with contextlib.suppress(ConnectionClosed):
                    await conn.send(frame)


def _price(product: str, rounds: int) -> str:
    """A price that moves, at two decimals (BTC-USD's and ETH-USD's)."""
    base = {"BTC-USD": 67250, "ETH-USD": 3450}.get(product, 150)
    return f"{base + (rounds % 100) / 100:.2f}"
