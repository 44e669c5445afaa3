"""Tick sources: where prices come from, one module each, chosen by `FEED_SOURCE`.

A source only says what the price is: it yields batches of `Quote`s, in order. The one
producer (app/feed/producer.py) stamps `seq` and `ts`, stores, folds candles and publishes,
whatever the source. Pushed quotes (`POST /v1/ingest`) reach the same producer through its
inbox, beside the source: `FEED_SOURCE=ingest` is a source that yields nothing.

Adding a source is a module here with a `create(settings, stats)` function returning a
`TickSource`, and one line in `SOURCES`.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Protocol

from app.instruments.repository import InstrumentInfo

if TYPE_CHECKING:
    from app.config import Settings
    from app.feed.stats import FeedStats

# FEED_SOURCE → the module that builds it (imported only when chosen).
SOURCES = {
    "simulated": "app.feed.sources.simulated",
    "replay": "app.feed.sources.replay",
    "coinbase": "app.feed.sources.coinbase",
    "ingest": "app.feed.sources.ingest",
}


@dataclass(frozen=True, slots=True)
class Quote:
    """One price from a source. Only `symbol` and `price` are required; the rest go into the
    tick when the source has them (`source_ts`: the source's own time, epoch ms)."""

    symbol: str
    price: Decimal
    bid: Decimal | None = None
    ask: Decimal | None = None
    volume: Decimal | None = None
    size: Decimal | None = None
    side: str | None = None  # "buy" | "sell"
    source_ts: int | None = None

    @property
    def traded(self) -> Decimal | None:
        """What this quote adds to its candles' volume: the trade's size, else `volume`."""
        return self.size if self.size is not None else self.volume


class Instruments(Protocol):
    """The active instruments, live: iterate it again to see instruments added or disabled
    while the producer runs (app/instruments/catalog.py)."""

    def __iter__(self) -> Iterator[InstrumentInfo]: ...

    def __contains__(self, symbol: object) -> bool: ...

    def get(self, symbol: str) -> InstrumentInfo | None: ...

    @property
    def version(self) -> int:
        """Changes whenever the set of instruments changes."""


class TickSource(Protocol):
    name: str

    def stream(
        self, instruments: Instruments, start_prices: dict[str, Decimal]
    ) -> AsyncIterator[list[Quote]]:
        """Yield batches of quotes, in order, until cancelled; `start_prices` continues a
        previous run. A bad record is counted (FeedStats.reject) and skipped, never raised."""
        ...


class SourceNotReady(RuntimeError):
    """The source cannot start as configured (a replay file that is missing, say): the
    message is the one line the operator sees."""


def create_source(settings: Settings, stats: FeedStats) -> TickSource:
    """The source `FEED_SOURCE` names; SourceNotReady when it cannot start."""
    module = importlib.import_module(SOURCES[settings.feed_source])
    source: TickSource = module.create(settings, stats)
    return source
