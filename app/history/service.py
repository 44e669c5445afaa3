"""One answer from two places: the fast retention window (the tick store, app/prices/store.py)
and the database behind it (app/history/reads.py).

What comes from where:
- `ticks_after` (REST `?since=`, every stream resume, the hub's gap repair): the window, and
  the database only when the window does not reach back to `since + 1`. A resume or a repair
  inside the window never touches the database.
- `ticks_between` (REST `?start=&end=`): the database, plus the window's ticks newer than the
  newest stored one (the writer lags the store by up to a batch), so a range ending now is
  complete.
- `candles`: the database, with the store's candles from the newest stored one on laid over
  it: the forming candle is as current as the store, and the rest outlive Redis.

The two never disagree on a tick: the same frame is kept under the same `(symbol, seq)` in
both, so where both have a seq either copy will do.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from app.db import DATABASE_ERRORS
from app.errors import Unavailable
from app.history import reads
from app.history.reads import Sessions
from app.prices.candles import INTERVALS_MS, Candle
from app.prices.store import TickStore
from app.prices.ticks import Tick

logger = logging.getLogger(__name__)


class HistoryUnavailable(Unavailable):
    """The database could not answer a read the window alone cannot."""


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a time range, in `(ts, seq)` order; `after`: the cursor of the next page
    (the last tick's `(ts, seq)`), None when nothing more remains."""

    ticks: list[Tick]
    after: tuple[int, int] | None


class History:
    """Reads across the retention window and the database. Without `sessions` (a hub built
    for a test, say) it reads the window alone."""

    def __init__(self, *, store: TickStore, sessions: Sessions | None, retention: int) -> None:
        self._store = store
        self._sessions = sessions
        self._retention = retention

    async def ticks_after(self, symbol: str, *, since: int, limit: int) -> list[Tick]:
        """The ticks with `seq > since`, oldest first, at most `limit`, with no gap that the
        window or the database can fill. HistoryUnavailable if the database was needed and
        could not answer."""
        if limit <= 0:
            return []
        # From `since` itself: the window reaches back far enough when it holds `since` (or,
        # for `since` 0 or a window that begins at the first seq, `since + 1`).
        window = await self._store.read_history(symbol, since=since - 1, limit=limit + 1)
        if window and window[0].seq <= since + 1:
            return [t for t in window if t.seq > since][:limit]
        later = [t for t in window if t.seq > since]
        if self._sessions is None:
            return later[:limit]
        below = later[0].seq if later else None
        try:
            stored = await reads.read_ticks_after(
                self._sessions, symbol=symbol, since=since, limit=limit, below=below
            )
        except DATABASE_ERRORS as exc:
            raise HistoryUnavailable("tick history unavailable; retry shortly") from exc
        return (stored + later)[:limit]

    async def newest_ticks(self, symbol: str, *, limit: int) -> list[Tick]:
        """The newest `limit` ticks, oldest first: the window's, and the database's before it
        when the window holds fewer (say, just after Redis restarted empty)."""
        window = await self._store.read_history(symbol, since=None, limit=limit)
        if len(window) >= limit or self._sessions is None:
            return window
        if window and window[0].seq <= 1:
            return window
        try:
            stored = await reads.read_ticks_before(
                self._sessions,
                symbol=symbol,
                below=window[0].seq if window else None,
                limit=limit - len(window),
            )
        except DATABASE_ERRORS as exc:
            raise HistoryUnavailable("tick history unavailable; retry shortly") from exc
        return stored + window

    async def ticks_between(
        self, symbol: str, *, start: int, end: int, after: tuple[int, int] | None, limit: int
    ) -> Page:
        """The ticks with `start <= ts < end` after the cursor `after`, in `(ts, seq)` order."""
        if self._sessions is None:
            stored, newest = [], None
        else:
            try:
                stored = await reads.read_ticks_between(
                    self._sessions,
                    symbol=symbol,
                    start=start,
                    end=end,
                    after=after,
                    limit=limit + 1,
                )
                newest = await reads.read_newest_seq(self._sessions, symbol=symbol)
            except DATABASE_ERRORS as exc:
                raise HistoryUnavailable("tick history unavailable; retry shortly") from exc
        # What the writer has not stored yet: the window past the newest stored seq.
        unwritten = await self._store.read_history(symbol, since=newest or 0, limit=self._retention)
        seen = {t.seq for t in stored}
        merged = stored + [
            t
            for t in unwritten
            if start <= t.ts < end
            and t.seq not in seen
            and (after is None or (t.ts, t.seq) > after)
        ]
        merged.sort(key=lambda t: (t.ts, t.seq))
        page = merged[:limit]
        more = len(merged) > limit
        return Page(page, (page[-1].ts, page[-1].seq) if more and page else None)

    async def candles(
        self, symbol: str, interval: str, *, start: int | None, end: int | None, limit: int
    ) -> list[Candle]:
        """Candles of `interval` starting in `[start, end)`, oldest first: the first `limit`
        from `start`, or the newest `limit` without it. The last one may still be forming."""
        stored: list[Candle] = []
        newest: int | None = None
        if self._sessions is not None:
            try:
                stored = await reads.read_candles(
                    self._sessions,
                    symbol=symbol,
                    interval=interval,
                    start=start,
                    end=end,
                    limit=limit,
                )
                newest = await reads.read_newest_candle_start(
                    self._sessions, symbol=symbol, interval=interval
                )
            except DATABASE_ERRORS as exc:
                raise HistoryUnavailable("candle history unavailable; retry shortly") from exc
        # The store's candles from the newest stored one on: the forming one, and any the
        # writer has not stored yet. How many that can be follows from the clock.
        wanted = limit
        if newest is not None:
            wanted = min(limit, (_now_ms() - newest) // INTERVALS_MS[interval] + 2)
        overlay = [
            c
            for c in await self._store.read_candles(symbol, interval, limit=max(wanted, 1))
            if (newest is None or c.start >= newest)
            and (start is None or c.start >= start)
            and (end is None or c.start < end)
        ]
        by_start = {c.start: c for c in stored}
        by_start.update((c.start, c) for c in overlay)  # the store's copy is the current one
        merged = [by_start[s] for s in sorted(by_start)]
        return merged[:limit] if start is not None else merged[-limit:]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
