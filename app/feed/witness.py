"""What a standby producer saw published: the newest tick of each symbol on the broker.

A producer in a process of its own (`python -m app.feed`) has no hub to ask what went out.
When Redis restarts empty and the leader dies with it, the store has forgotten every seq and
the database is up to a flush behind; the one record left of the newest ticks is what the
subscribers received. So while this producer stands by, it subscribes to the price channels
too and keeps the newest tick per symbol; when it leads, it stops (it publishes them itself),
and its producer takes these as proof of the seq of record (app/feed/producer.py, `_resume`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from app.broker import Broker, price_channel
from app.feed.sources import Instruments
from app.prices.ticks import MalformedTick, Tick, decode_tick

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.2


class PublishedTicks:
    def __init__(self, broker: Broker, instruments: Instruments) -> None:
        self._broker = broker
        self._instruments = instruments
        self._latest: dict[str, Tick] = {}

    def latest(self) -> Mapping[str, Tick]:
        """The newest tick seen per symbol (read-only)."""
        return self._latest

    async def run(self, *, leading: Callable[[], bool]) -> None:
        """Watch while `leading()` is false, until cancelled."""
        while True:
            while leading():
                await asyncio.sleep(POLL_SECONDS)
            channels = [price_channel(i.symbol) for i in self._instruments]
            async with self._broker.subscribe_bursts(channels, self._on_burst) as subscription:
                while not leading():
                    await asyncio.sleep(POLL_SECONDS)
                    # Instruments added since: watched too.
                    await subscription.add(price_channel(i.symbol) for i in self._instruments)

    def _on_burst(self, messages: list[tuple[str, str]]) -> None:
        latest = self._latest
        for _channel, text in messages:
            try:
                tick = decode_tick(text)
            except MalformedTick:
                continue
            known = latest.get(tick.symbol)
            if known is None or tick.seq > known.seq:
                latest[tick.symbol] = tick
