"""Our delivery, beside broadcaster's: which burst sinks take which channel, and each read's
messages handed to each sink together, from the read itself.

`broadcaster.Broadcast.subscribe` cannot carry this (see the package docstring): it puts
every event on one unbounded queue per subscriber, from a listener task of its own."""

from __future__ import annotations

import logging
from collections.abc import Callable

from app import metrics

logger = logging.getLogger(__name__)

BurstSink = Callable[[list[tuple[str, str]]], None]
"""Takes the (channel, message) pairs of one read, in order. It must not block; what it raises
is logged and counted (`pricefeed_broker_dropped_total{reason="sink_failed"}`) and the
subscription goes on."""


class Fanout:
    """The backends call `message` for each message of a read, then `read_end`, which hands
    every sink what the read brought it. Memory held here is one read's worth."""

    def __init__(self) -> None:
        self._sinks: dict[str, tuple[BurstSink, ...]] = {}
        self._bursts: dict[BurstSink, list[tuple[str, str]]] = {}  # this read's, per sink

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
        for sink in sinks:
            burst = self._bursts.get(sink)
            if burst is None:
                self._bursts[sink] = [(channel, message)]
            else:
                burst.append((channel, message))

    def read_end(self) -> None:
        """Hand every sink what this read brought it."""
        if not self._bursts:
            return
        bursts, self._bursts = self._bursts, {}
        for sink, messages in bursts.items():
            try:
                sink(messages)
            except Exception:  # its bug must not take the subscription down
                metrics.BROKER_DROPPED.labels(reason="sink_failed").inc(len(messages))
                logger.exception("broker: a burst subscriber failed")
