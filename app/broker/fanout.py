"""Our delivery, beside broadcaster's: which burst sinks take which channel, and each read's
messages handed to each sink together, from the read itself.

`broadcaster.Broadcast.subscribe` cannot carry this (see the package docstring): it puts
every event on one unbounded queue per subscriber, from a listener task of its own.

With a coalescing window (`FANOUT_COALESCE_MS`), the reads of that window go to the sinks as
one burst, handed over when it ends: a feed that sends ticks one by one then pays a burst's
fixed cost (sequencer, hub, lane writes) once per window instead of once per read, for up to
the window in latency. docs/performance.md has the numbers that chose its default."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from app import metrics

logger = logging.getLogger(__name__)

BurstSink = Callable[[list[tuple[str, str]]], None]
"""Takes the (channel, message) pairs of one read, in order. It must not block; what it raises
is logged and counted (`pricefeed_broker_dropped_total{reason="sink_failed"}`) and the
subscription goes on."""


COALESCE_MAX_MESSAGES = 1000
"""A window that gathers this many messages is handed over at once: a burst stays bounded."""


class Fanout:
    """The backends call `message` for each message of a read, then `read_end`, which hands
    every sink what the read brought it (or, with a window, what the window's reads brought
    it, once the window ends). Memory held here is one read's worth, or one window's, at most
    `COALESCE_MAX_MESSAGES` messages."""

    def __init__(self, *, coalesce_seconds: float = 0.0) -> None:
        if coalesce_seconds < 0:
            raise ValueError(f"coalesce_seconds must be >= 0, not {coalesce_seconds}")
        self._sinks: dict[str, tuple[BurstSink, ...]] = {}
        self._bursts: dict[BurstSink, list[tuple[str, str]]] = {}  # this read's, per sink
        self._coalesce = coalesce_seconds
        self._held = 0  # messages gathered in the open window
        self._window: asyncio.TimerHandle | None = None  # when the open window ends

    def add(self, channel: str, sink: BurstSink) -> bool:
        """Register `sink` on `channel`; True if it is the channel's first."""
        sinks = self._sinks.get(channel, ())
        if sink in sinks:
            raise ValueError(f"this sink already takes {channel}")
        self._sinks[channel] = (*sinks, sink)
        return not sinks

    def remove(self, channel: str, sink: BurstSink) -> bool:
        """Unregister `sink` from `channel`; True if nobody takes the channel any more."""
        rest = tuple(s for s in self._sinks.get(channel, ()) if s != sink)
        if rest:
            self._sinks[channel] = rest
            return False
        self._sinks.pop(channel, None)
        return True

    def takes(self, channel: str) -> bool:
        return channel in self._sinks

    def message(self, channel: str, message: str) -> None:
        sinks = self._sinks.get(channel)
        if sinks is None:
            return  # unsubscribed while the message was on its way
        self._held += 1
        for sink in sinks:
            burst = self._bursts.get(sink)
            if burst is None:
                self._bursts[sink] = [(channel, message)]
            else:
                burst.append((channel, message))

    def read_end(self) -> None:
        """Hand every sink what this read brought it; with a window, open one (if none is)
        whose end hands over every read's messages until then."""
        if not self._bursts:
            return
        if self._coalesce and self._held < COALESCE_MAX_MESSAGES:
            if self._window is None:
                self._window = asyncio.get_running_loop().call_later(
                    self._coalesce, self._window_end
                )
            return
        self._hand_over()

    def _window_end(self) -> None:
        self._window = None
        self._hand_over()

    def _hand_over(self) -> None:
        if self._window is not None:  # a full window goes before its time
            self._window.cancel()
            self._window = None
        self._held = 0
        if not self._bursts:
            return
        bursts, self._bursts = self._bursts, {}
        for sink, messages in bursts.items():
            try:
                sink(messages)
            except Exception:  # its bug must not take the subscription down
                metrics.BROKER_DROPPED.labels(reason="sink_failed").inc(len(messages))
                logger.exception("broker: a burst subscriber failed")
