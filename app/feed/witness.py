"""What a producer saw published: the newest tick of each symbol on the broker.

A producer in a process of its own (`python -m app.feed`) has no hub to ask what went out.
When Redis restarts empty and the leader dies with it, the store has forgotten every seq and
the database is up to a flush behind; the one record left of the newest ticks is what the
subscribers received. So this producer subscribes to the price channels too and keeps the
newest ticks per symbol (the retention window's worth). Its producer takes the newest as proof
of the seq of record (app/feed/resume.py), and writes the window to history with the store's:
ticks the dead leader published but had not written yet are kept after all.

It watches from the start and all along, its own producer's terms included: what that
producer published is proven too when Redis loses it (a term ended by Redis restarting empty
resumes where it was, not past the database by the checkpoint margin), and there is no gap
between one of its terms and the watch after it in which another leader could publish
unseen. Only while the broker reconnects (Redis itself down or restarting) is nothing seen.

A producer inside a server asks its hub instead (`HubWitness`): the newest tick it passed on.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Mapping
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
    """The broker's price channels, watched for as long as the process runs."""

    def __init__(self, broker: Broker, instruments: Instruments, *, keep: int) -> None:
        self._broker = broker
        self._instruments = instruments
        self._keep = keep
        self._latest: dict[str, Tick] = {}
        # Each channel's frames as received, newest last: decoded only when asked for (at a
        # term's start), so watching costs a full speed producer an append a tick, not a parse.
        self._frames: dict[str, deque[str]] = {}

    def latest(self) -> Mapping[str, Tick]:
        return self._latest

    def recent(self, symbol: str) -> list[Tick]:
        ticks: list[Tick] = []
        for text in self._frames.get(price_channel(symbol), ()):
            tick = _decoded(text)
            if (
                tick is not None
                and tick.symbol == symbol
                and (not ticks or tick.seq > ticks[-1].seq)
            ):
                ticks.append(tick)
        return ticks

    async def run(self) -> None:
        """Watch until cancelled. Never paused while this process leads: a term's ticks were
        seen only if they were watched as they went out, and a pause would leave a gap when
        the term ends (the term's end seen up to a poll late, then a subscribe to make)."""
        channels = [price_channel(i.symbol) for i in self._instruments]
        async with self._broker.subscribe_bursts(channels, self._on_burst) as subscription:
            while True:
                await asyncio.sleep(POLL_SECONDS)
                # Instruments added since: watched too.
                await subscription.add(price_channel(i.symbol) for i in self._instruments)

    def _on_burst(self, messages: list[tuple[str, str]]) -> None:
        frames, newest = self._frames, {}
        for channel, text in messages:
            kept = frames.get(channel)
            if kept is None:
                kept = frames[channel] = deque(maxlen=self._keep)
            kept.append(text)
            newest[channel] = text
        # A channel's frames come in the order they were published: of a read, its last one
        # is the newest (decoded; one that does not decode leaves what was known).
        latest = self._latest
        for text in newest.values():
            tick = _decoded(text)
            if tick is None:
                continue
            known = latest.get(tick.symbol)
            if known is None or tick.seq > known.seq:
                latest[tick.symbol] = tick


def _decoded(text: str) -> Tick | None:
    try:
        return decode_tick(text)
    except MalformedTick:
        return None
