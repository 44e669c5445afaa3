"""`SyncPricefeedClient`: the client without `async`, for scripts and notebooks.

Its event loop runs in a thread of its own, so it also works where a loop is already running
in the calling thread (Jupyter)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator, Sequence
from datetime import datetime
from typing import Any, TypeVar

from pricefeed_client.client import Interval, PricefeedClient
from pricefeed_client.events import StreamEvent
from pricefeed_client.models import Candle, Symbol, Tick

T = TypeVar("T")


class SyncPricefeedClient:
    """`PricefeedClient`'s methods, blocking. `with SyncPricefeedClient(url) as feed:`
    (same arguments), or call `close()`."""

    def __init__(self, url: str | None = None, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="pricefeed-client", daemon=True
        )
        self._thread.start()
        self._client = self._call(_build(url, options))

    def __enter__(self) -> SyncPricefeedClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._call(self._client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def _call(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    def symbols(self) -> list[Symbol]:
        return self._call(self._client.symbols())

    def latest(self, symbol: str) -> Tick:
        return self._call(self._client.latest(symbol))

    def prices(self, symbols: Sequence[str]) -> list[Tick]:
        return self._call(self._client.prices(symbols))

    def history(
        self,
        symbol: str,
        *,
        since: int | None = None,
        start: datetime | int | None = None,
        end: datetime | int | None = None,
        limit: int = 100,
    ) -> list[Tick]:
        return self._call(
            self._client.history(symbol, since=since, start=start, end=end, limit=limit)
        )

    def candles(
        self,
        symbol: str,
        *,
        interval: Interval = "1m",
        start: datetime | int | None = None,
        end: datetime | int | None = None,
        limit: int = 100,
    ) -> list[Candle]:
        return self._call(
            self._client.candles(symbol, interval=interval, start=start, end=end, limit=limit)
        )

    def watch(
        self,
        symbols: Sequence[str],
        *,
        refill: bool = True,
        on_event: Callable[[StreamEvent], object] | None = None,
    ) -> Iterator[Tick]:
        """Ticks as they come (blocking between them); stop with `break`."""
        ticks = self._client.watch(symbols, refill=refill, on_event=on_event)
        try:
            while True:
                try:
                    yield self._call(_next(ticks))
                except StopAsyncIteration:
                    return
        finally:
            self._call(ticks.aclose())


async def _next(ticks: AsyncGenerator[Tick, None]) -> Tick:
    return await anext(ticks)


async def _build(url: str | None, options: dict[str, Any]) -> PricefeedClient:
    return PricefeedClient(url, **options)  # made in its loop's thread, as httpx prefers
