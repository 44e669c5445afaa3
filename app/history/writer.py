"""The history writer: every published tick and every candle state into the database, in
batches, off the fan-out path.

The producer hands each batch's runs to `offer` right after publishing them: a plain append
to a bounded buffer, no await, so a slow or unavailable database never delays a tick. `run`
(a task of the producer's leadership term) writes the buffer every `FLUSH_SECONDS`, or as soon
as a whole transaction's worth (`MAX_BATCH_TICKS`) waits; a write that fails goes back
to the front of the buffer and is retried with backoff. Full, the buffer drops its oldest
ticks and counts them (`pricefeed_history_dropped_total`). Candles are kept as their latest
state per (symbol, interval, start), the forming one included, and upserted with the ticks.

At the start of a term the writer also writes the retention window it finds in the store
(`backfill`): ticks a previous leader published but had not written when it died. Every write
is idempotent (app/history/records.py), so writing a tick twice costs a little and changes
nothing. Rows older than `HISTORY_DAYS` are deleted in chunks every `PURGE_EVERY_SECONDS`.

On a graceful stop, once the producer has stopped offering, the process calls `flush`: what
the buffer still holds (up to `FLUSH_SECONDS` of ticks) is written then, within
`FLUSH_ON_STOP_SECONDS`, so that a stopped producer leaves no tick it published out of the
database. A database that is down or too slow for that loses them (logged, with the count):
the stop is not held up for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

from app.backoff import Backoff
from app.config import Settings
from app.history.records import CandleKey, CandleValues, HistoryRecords
from app.history.status import HistoryReport
from app.prices.candles import INTERVALS_MS
from app.prices.store import Run
from app.prices.ticks import Tick

logger = logging.getLogger(__name__)

FLUSH_SECONDS = 0.25
# Per transaction: a catch-up after an outage goes in steps. A transaction costs SQLite per
# index page it touches more than per row: with 100 symbols, flushing at 500 ticks wrote an
# index page of each symbol for five rows, and the inserts took ~10 µs of CPU a tick against
# ~4 in transactions of 10,000 (the producer at full speed: a flush every 250 ms).
MAX_BATCH_TICKS = 10_000
FLUSH_TICKS = MAX_BATCH_TICKS  # this many waiting: written at once, not at the next period
WRITE_TIMEOUT_SECONDS = 10.0
STOP_WAIT_SECONDS = 1.0  # a write in flight when the term ends: let finish this long
# Within the lifespan's shutdown step (3 s) and the feed process's cleanup (5 s).
FLUSH_ON_STOP_SECONDS = 2.0
REPORT_SECONDS = 1.0
PURGE_EVERY_SECONDS = 60.0
PURGE_CHUNK_ROWS = 5_000
BACKFILL_TIMEOUT_SECONDS = 5.0
_DAY_MS = 86_400_000


class HistoryWriter:
    def __init__(
        self,
        records: HistoryRecords,
        *,
        max_ticks: int,
        days: int,
        report: HistoryReport | None = None,
    ) -> None:
        self.records = records
        self._days = days
        self._report = report
        self._ticks: deque[Tick] = deque(maxlen=max_ticks)
        # The oldest tick of a write in flight: not written yet either, though not waiting.
        self._writing_from: int | None = None
        self._candles: dict[CandleKey, CandleValues] = {}
        self._dropped = 0  # since the last report
        self.dropped_total = 0
        self.failing = False
        self._wake = asyncio.Event()

    def offer(self, runs: Sequence[Run]) -> None:
        """Take `runs` (published) for writing: called on the producer's path, so it only
        appends. Past the buffer's size the oldest ticks go, counted."""
        ticks, candles = self._ticks, self._candles
        before = len(ticks)
        added = 0
        for run in runs:
            ticks.extend(run.ticks)
            added += len(run.ticks)
            symbol = run.symbol
            for interval, c in run.candles:
                # The values, not the object: the producer folds the next tick into it.
                candles[(symbol, interval, c.start)] = (c.open, c.high, c.low, c.close, c.volume)
        over = before + added - len(ticks)
        if over:
            self._dropped += over
            self.dropped_total += over
        if len(ticks) >= FLUSH_TICKS:
            self._wake.set()

    @property
    def pending(self) -> int:
        """Ticks waiting to be written."""
        return len(self._ticks)

    def lag_seconds(self, now_ms: int | None = None) -> float:
        """Age of the oldest tick not written yet, waiting or in a write (0: none)."""
        oldest = self._writing_from
        if self._ticks and (oldest is None or self._ticks[0].ts < oldest):
            oldest = self._ticks[0].ts
        if oldest is None:
            return 0.0
        now_ms = now_ms if now_ms is not None else time.time_ns() // 1_000_000
        return max(now_ms - oldest, 0) / 1000

    async def run(self, *, backfill: Callable[[], Awaitable[list[Run]]] | None = None) -> None:
        """Write until cancelled (the producer runs it for as long as it leads). `backfill`:
        what the store kept, written first."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._report_forever(), name="history-report")
            if backfill is not None:
                await self._take_backfill(backfill)
            await self._write_forever()

    async def _take_backfill(self, backfill: Callable[[], Awaitable[list[Run]]]) -> None:
        try:
            async with asyncio.timeout(BACKFILL_TIMEOUT_SECONDS):
                runs = await backfill()
        except Exception as exc:  # noqa: BLE001 - what the store kept may be gone: go on
            logger.warning("history: the store's retention window not read (%s)", exc)
            return
        # At the front: the oldest. Past the buffer's room, the oldest of them are dropped.
        ticks = [t for run in runs for t in run.ticks]
        self._restore(ticks, {})
        for run in runs:
            for interval, c in run.candles:
                key = (run.symbol, interval, c.start)
                self._candles.setdefault(key, (c.open, c.high, c.low, c.close, c.volume))

    async def _write_forever(self) -> None:
        backoff = Backoff(base=0.25, cap=10.0)
        purge_due = time.monotonic() + 5.0  # soon after a term starts, then periodically
        while True:
            if len(self._ticks) < FLUSH_TICKS:
                try:
                    async with asyncio.timeout(FLUSH_SECONDS):
                        await self._wake.wait()
                except TimeoutError:
                    pass
            self._wake.clear()
            if not self._ticks and not self._candles:
                continue
            batch = self._take_batch()
            candles, self._candles = self._candles, {}
            write = asyncio.ensure_future(self._write(batch, candles))
            try:
                await asyncio.shield(write)
            except asyncio.CancelledError:
                # The term ends: a write in flight is let finish (briefly) rather than
                # cancelled inside the driver, where SQLAlchemy's aiosqlite adapter leaves a
                # close behind that never ends and hangs the event loop's shutdown. What was
                # not written is kept for this process's next term (written twice at worst).
                await asyncio.wait({write}, timeout=STOP_WAIT_SECONDS)
                if not write.done() or write.cancelled() or write.exception() is not None:
                    self._restore(batch, candles)
                raise
            except Exception as exc:  # noqa: BLE001 - kept, and retried with backoff
                self._restore(batch, candles)
                delay = backoff.next_delay()
                if not self.failing or backoff.attempt % 20 == 0:
                    logger.warning(
                        "history: write of %d ticks failed (%s: %s); %d waiting, retrying",
                        len(batch),
                        type(exc).__name__,
                        exc,
                        len(self._ticks),
                    )
                self.failing = True
                await asyncio.sleep(delay)
                continue
            if self.failing:
                logger.info("history: writing again; %d ticks waiting", len(self._ticks))
            self.failing = False
            backoff.reset()
            if self._days and time.monotonic() >= purge_due and len(self._ticks) < FLUSH_TICKS:
                purge_due = time.monotonic() + PURGE_EVERY_SECONDS
                await self._purge()

    async def flush(self, *, timeout: float = FLUSH_ON_STOP_SECONDS) -> int:
        """Write everything the buffer holds, giving up after `timeout` seconds or at the
        first failure; the number of ticks left unwritten (0: all of them are in the
        database). For a process that stops: call it once `run` has ended and nothing more
        is offered. A write still going at the deadline is left to end on its own, never
        cancelled inside the driver (see `_write_forever`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        why = ""
        while self._ticks or self._candles:
            batch = self._take_batch()
            candles, self._candles = self._candles, {}
            write = asyncio.ensure_future(self._write(batch, candles))
            done, _ = await asyncio.wait({write}, timeout=max(deadline - loop.time(), 0))
            if not done:
                write.add_done_callback(_ignore_outcome)
                self._restore(batch, candles)  # not known to be written
                why = f"no answer within {timeout:.1f} s"
                break
            if write.cancelled() or write.exception() is not None:
                self._restore(batch, candles)
                error = write.exception() if not write.cancelled() else None
                why = f"{type(error).__name__}: {error}" if error else "cancelled"
                break
        left = len(self._ticks)
        if left:
            logger.warning("history: stopping with %d ticks not written (%s)", left, why)
        return left

    def _take_batch(self) -> list[Tick]:
        """The oldest ticks waiting, at most a transaction's worth."""
        ticks = self._ticks
        if len(ticks) <= MAX_BATCH_TICKS:
            batch = list(ticks)
            ticks.clear()
            return batch
        return [ticks.popleft() for _ in range(MAX_BATCH_TICKS)]

    async def _write(self, ticks: list[Tick], candles: dict[CandleKey, CandleValues]) -> None:
        # A batch is taken oldest first (the database gets a sorted copy): its first is oldest.
        self._writing_from = ticks[0].ts if ticks else None
        try:
            async with asyncio.timeout(WRITE_TIMEOUT_SECONDS):
                await self.records.write(ticks, candles)
        finally:  # written, or put back to wait (`_restore`)
            self._writing_from = None

    def _restore(self, ticks: list[Tick], candles: dict[CandleKey, CandleValues]) -> None:
        """Put `ticks` (older than any waiting) back at the front; the newer state of a candle
        offered meanwhile wins."""
        room = (self._ticks.maxlen or 0) - len(self._ticks)
        kept = ticks[-room:] if room > 0 else []
        lost = len(ticks) - len(kept)
        if lost:
            self._dropped += lost
            self.dropped_total += lost
        self._ticks.extendleft(reversed(kept))
        for key, values in candles.items():
            self._candles.setdefault(key, values)

    async def _purge(self) -> None:
        cutoff = time.time_ns() // 1_000_000 - self._days * _DAY_MS
        try:
            async with asyncio.timeout(WRITE_TIMEOUT_SECONDS * 6):
                deleted = await self.records.delete_older_than(
                    cutoff, intervals=INTERVALS_MS, chunk=PURGE_CHUNK_ROWS
                )
        except Exception as exc:  # noqa: BLE001 - the next purge goes on from there
            logger.warning("history: deleting rows past %d days failed (%s)", self._days, exc)
            return
        if deleted:
            logger.info("history: deleted %d rows older than %d days", deleted, self._days)

    async def _report_forever(self) -> None:
        if self._report is None:
            return
        while True:
            dropped, self._dropped = self._dropped, 0
            try:
                await self._report.write(
                    lag_seconds=self.lag_seconds(), failing=self.failing, dropped=dropped
                )
            except Exception as exc:  # noqa: BLE001 - added to the next report
                self._dropped += dropped
                logger.debug("history: state not reported (%s)", exc)
            await asyncio.sleep(REPORT_SECONDS)


def _ignore_outcome(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()


def create_history_writer(
    settings: Settings, records: HistoryRecords, report: HistoryReport
) -> HistoryWriter | None:
    """None when HISTORY_DAYS=0: nothing is written."""
    if settings.history_days == 0:
        return None
    return HistoryWriter(
        records, max_ticks=settings.history_buffer_ticks, days=settings.history_days, report=report
    )
