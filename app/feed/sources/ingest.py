"""FEED_SOURCE=ingest: no source of its own; the producer publishes only what is pushed to
`POST /v1/ingest` (which reaches it through its inbox whatever the source)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import TYPE_CHECKING

from app.feed.sources import Instruments, Quote

if TYPE_CHECKING:
    from app.config import Settings
    from app.feed.stats import FeedStats


def create(settings: Settings, stats: FeedStats) -> IngestOnly:
    return IngestOnly()


class IngestOnly:
    name = "ingest"

    async def stream(
        self, instruments: Instruments, start_prices: dict[str, Decimal]
    ) -> AsyncIterator[list[Quote]]:
        await asyncio.Event().wait()  # until cancelled
        yield []  # pragma: no cover - makes this an async generator
