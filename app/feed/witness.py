"""What a standby producer saw published: the newest tick of each symbol on the broker.

A producer in a process of its own (`python -m app.feed`) has no hub to ask what went out.
When Redis restarts empty and the leader dies with it, the store has forgotten every seq and
the database is up to a flush behind; the one record left of the newest ticks is what the
subscribers received. So while this producer stands by, it subscribes to the price channels
too and keeps the newest ticks per symbol (the retention window's worth); when it leads, it
stops (it publishes them itself). Its producer takes the newest as proof of the seq of record
(app/feed/resume.py), and writes the window to history with the store's: ticks
the dead leader published but had not written yet are kept after all.

A producer inside a server asks its hub instead (`HubWitness`): the newest tick it passed on.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Mapping
from typing import Protocol

from app.broker import Broker, price_channel
from app.feed.sources import Instruments
from app.prices.hub import FanoutHub
from app.prices.ticks import MalformedTick, Tick, decode_tick

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.2


class Witness(Protocol):
    def latest(self) -> Mapping[str, Tick]:
        """The newest tick seen published, per symbol."""

    def recent(self, symbol: str) -> list[Tick]:
        """The ticks of `symbol` seen lately, oldest first (as many as it keeps)."""


class HubWitness:
    """What this process's hub passed on: its newest tick per symbol."""

    def __init__(self, hub: FanoutHub) -> None:
        self._hub = hub

    def latest(self) -> Mapping[str, Tick]:
        return self._hub.latest_passed_on

    def recent(self, symbol: str) -> list[Tick]:
        tick = self._hub.latest_passed_on.get(symbol)
        return [] if tick is None else [tick]


class PublishedTicks:
    """The broker's price channels, watched while this producer stands by."""

    def __init__(self, broker: Broker, instruments: Instruments, *, keep: int) -> None:
        self._broker = broker
        self._instruments = instruments
        self._keep = keep
        self._latest: dict[str, Tick] = {}
        self._recent: dict[str, deque[Tick]] = {}

    def latest(self) -> Mapping[str, Tick]:
        return self._latest

    def recent(self, symbol: str) -> list[Tick]:
        return list(self._recent.get(symbol, ()))

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
        latest, recent = self._latest, self._recent
        for _channel, text in messages:
            try:
                tick = decode_tick(text)
            except MalformedTick:
                continue
            symbol = tick.symbol
            known = latest.get(symbol)
            if known is None or tick.seq > known.seq:
                latest[symbol] = tick
                kept = recent.get(symbol)
                if kept is None:
                    kept = recent[symbol] = deque(maxlen=self._keep)
                kept.append(tick)
