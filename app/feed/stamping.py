"""Stamping: a symbol's quotes become its next ticks (`seq`, `ts`, the frame) and the candles
they fold into, ahead of what the store has confirmed.

The producer sends a batch's fenced write and stamps the next batch while that write is in
Redis, so a batch is stamped from what the batches before it were stamped with, not from what
the store confirmed (`FeedState`, app/feed/resume.py). What is stamped ahead is kept apart
here, and forgotten at a term's start: a batch that was never confirmed (its write refused,
its lease lost, its answer lost) leaves nothing in the state a next term starts from, which
takes each symbol up at its seq of record again (a written batch whose answer was lost is
found in the store then; its seq is never stamped twice)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from decimal import Decimal

from app.feed.resume import FeedState
from app.feed.sources import Quote
from app.prices.candles import INTERVALS_MS, fold_prices
from app.prices.store import Run
from app.prices.ticks import Tick, encode_tick

_ZERO = Decimal(0)
_INTERVALS = tuple(INTERVALS_MS.items())


class Stamper:
    def __init__(self, confirmed: FeedState) -> None:
        self._confirmed = confirmed
        self._ahead = FeedState()  # what batches in flight were stamped with, per symbol
        self._intervals: dict[str, list[tuple[str, int, tuple[str, str]]]] = {}

    def new_term(self) -> None:
        """Forget what was stamped ahead: stamp from what the store confirmed."""
        self._ahead = FeedState()

    def stamp(self, symbol: str, quotes: Sequence[tuple[Quote, str | None]]) -> Run:
        """The ticks of one symbol's quotes (each with its inbox mark, or None): the next seqs,
        `ts` from this clock (never going back; one reading for the run: they were stamped
        together), and the candles they fold into. The next run of `symbol` follows it."""
        ahead, confirmed = self._ahead, self._confirmed
        seq = ahead.seq.get(symbol) or confirmed.seq.get(symbol, 0)
        ts = max(time.time_ns() // 1_000_000, ahead.ts.get(symbol) or confirmed.ts.get(symbol, 0))
        ticks: list[Tick] = []
        traded = _ZERO
        for quote, _mark in quotes:
            seq += 1
            ticks.append(
                encode_tick(
                    symbol=symbol,
                    price=quote.price,
                    ts=ts,
                    seq=seq,
                    bid=quote.bid,
                    ask=quote.ask,
                    volume=quote.volume,
                    size=quote.size,
                    side=quote.side,
                    source_ts=quote.source_ts,
                )
            )
            traded += quote.traded or _ZERO
        if len(quotes) == 1:  # the usual run of a paced source: one quote per symbol a batch
            first = last = high = low = quotes[0][0].price
        else:
            prices = [quote.price for quote, _mark in quotes]
            first, last, high, low = prices[0], prices[-1], max(prices), min(prices)
        # One `ts` for the run: each interval's candle takes all of it (never two candles).
        ahead_candles, confirmed_candles = ahead.candles, confirmed.candles
        candles = []
        intervals = self._intervals.get(symbol)
        if intervals is None:  # its candles' keys, made once: a run is stamped every tick
            intervals = self._intervals[symbol] = [
                (interval, interval_ms, (symbol, interval)) for interval, interval_ms in _INTERVALS
            ]
        for interval, interval_ms, key in intervals:
            current = ahead_candles.get(key) or confirmed_candles.get(key)
            candle = fold_prices(current, interval_ms, ts, first, high, low, last, traded)
            if current is not None and candle.start != current.start:
                candles.append((interval, current))  # the candle it closed, as it was left
            candles.append((interval, candle))
        run = Run(symbol, ticks, candles, mark=quotes[-1][1])
        ahead.take_run(run, last)
        return run
