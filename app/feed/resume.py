"""Where a leadership term takes each symbol up: its seq of record, and its candles.

The seq of record is the newest tick proven published: the store's latest (written before
every publish), or the newest this process saw go out (`witness`: after Redis restarted empty
while the leader died). The database's history and the seq checkpoints are evidence too, but
not of the newest: the history writer is up to a flush behind, and a checkpoint a couple of
seconds. Where they are all there is, or they are ahead of the proof, ticks after them may have
been published and stored nowhere: seq resumes past them by the checkpoint margin, a jump a
client sees, never a seq published twice.

`FeedState` is what the producer holds of each symbol (seq, ts, price, candles), confirmed by
the store; `SeqOfRecord` fills it in at a term's start, and for an instrument added during one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

from app.feed.checkpoints import SeqCheckpoints
from app.feed.sources import Instruments
from app.feed.witness import Witness
from app.history.writer import HistoryWriter
from app.prices.candles import INTERVALS_MS, Candle
from app.prices.store import Run, TickStore
from app.prices.ticks import Tick

logger = logging.getLogger(__name__)

# The database's part in a term's start (newest ticks, checkpoints, candles): never longer.
RESUME_DB_SECONDS = 2.0
# A term's start re-writes the store's retention window to history: at most this many a symbol.
BACKFILL_TICKS = 1_000_000

_T = TypeVar("_T")


class CannotResume(Exception):
    """Some symbol's last published seq cannot be proven (the store lost it and the database
    does not answer): publishing it could reuse a seq, so this term ends and is retried."""


@dataclass
class FeedState:
    """Per symbol, the newest tick the store confirmed: its seq, its `ts` (never going back),
    its price, and the candle of each interval it left. Kept across leadership terms: if Redis
    restarts empty, seq and prices carry on."""

    seq: dict[str, int] = field(default_factory=dict)
    ts: dict[str, int] = field(default_factory=dict)
    prices: dict[str, Decimal] = field(default_factory=dict)
    candles: dict[tuple[str, str], Candle] = field(default_factory=dict)

    def take_newest(self, ticks: Iterable[Tick]) -> None:
        """Go on from each of `ticks` that is newer than what is held."""
        for tick in ticks:
            symbol = tick.symbol
            if tick.seq > self.seq.get(symbol, 0):
                self.seq[symbol] = tick.seq
                self.ts[symbol] = max(tick.ts, self.ts.get(symbol, 0))
                price = tick.as_dict().get("price")
                if isinstance(price, str):
                    self.prices[symbol] = Decimal(price)

    def take_run(self, run: Run, price: Decimal) -> None:
        """Go on from `run`, which the store has just kept, its last quote at `price`."""
        last = run.ticks[-1]
        self.seq[run.symbol], self.ts[run.symbol] = last.seq, last.ts
        self.prices[run.symbol] = price
        for interval, candle in run.candles:
            self.candles[(run.symbol, interval)] = candle


class SeqOfRecord:
    """Takes symbols up into `state` at their seq of record, once a term each."""

    def __init__(
        self,
        state: FeedState,
        *,
        store: TickStore,
        instruments: Instruments,
        witness: Witness | None = None,
        history: HistoryWriter | None = None,
        checkpoints: SeqCheckpoints | None = None,
        checkpoint_margin: int = 0,
    ) -> None:
        self._state = state
        self._store = store
        self._instruments = instruments
        # The newest tick this process saw published per symbol, whoever published it (its
        # server's hub, or app/feed/witness.py beside a producer of its own): evidence of the
        # seq of record that outlives both Redis and the leader that published it.
        self._witness = witness
        self._history = history
        self._checkpoints = checkpoints
        # Ticks that may have gone out after the last checkpoint: skipped over on resume.
        self._checkpoint_margin = checkpoint_margin
        # Symbols taken up in this leadership term.
        self._resumed: set[str] = set()

    def new_term(self) -> None:
        """Another leader may have published since this one last led: every symbol is taken
        up again."""
        self._resumed.clear()

    async def resume(self, symbols: list[str]) -> None:
        """Take up those of `symbols` not taken up yet this term, at their seq of record, and
        their candles where they were left. CannotResume if a seq cannot be proven."""
        symbols = [s for s in symbols if s not in self._resumed]
        if not symbols:
            return
        state = self._state
        proven: dict[str, Tick] = dict(await self._store.read_latest(symbols))
        if self._witness is not None:
            seen = self._witness.latest()
            for symbol in symbols:
                tick = seen.get(symbol)
                if tick is not None and (symbol not in proven or tick.seq > proven[symbol].seq):
                    proven[symbol] = tick
        state.take_newest(proven.values())
        stored_candles: dict[tuple[str, str], Candle] = {}
        for symbol in symbols:
            for interval in INTERVALS_MS:
                kept = await self._store.read_candles(symbol, interval, limit=1)
                if kept:
                    stored_candles[(symbol, interval)] = kept[-1]
        lost = [k for k in _keys(symbols) if k not in stored_candles and k not in state.candles]
        recorded, checkpointed, candles = await self._read_evidence(symbols, lost, proven)
        state.take_newest(recorded.values())
        for symbol in symbols:
            evidence = max(
                recorded[symbol].seq if symbol in recorded else 0, checkpointed.get(symbol, 0)
            )
            proof = proven.get(symbol)
            if evidence == 0 or (proof is not None and proof.seq >= evidence):
                continue  # exact: from the proof, or never published as far as anyone knows
            state.seq[symbol] = max(state.seq.get(symbol, 0), evidence) + self._checkpoint_margin
            logger.warning(
                "producer: %s newest published seq unknown (the store lost it; history has "
                "%d); seq resumes at %d, past what may have gone out unrecorded",
                symbol,
                evidence,
                state.seq[symbol] + 1,
            )
        for key, candle in (candles | stored_candles).items():
            if key not in state.candles or candle.start >= state.candles[key].start:
                state.candles[key] = candle
        self._resumed.update(symbols)

    async def _read_evidence(
        self, symbols: list[str], lost: list[tuple[str, str]], proven: dict[str, Tick]
    ) -> tuple[dict[str, Tick], dict[str, int], dict[tuple[str, str], Candle]]:
        """The database's evidence, bounded in time. Without it, the store's proof alone if
        every symbol has one; CannotResume if some symbol has none and the database was
        meant to have it."""
        try:
            return await _bounded(self._read_records(symbols, lost), RESUME_DB_SECONDS)
        except Exception as exc:  # a database that does not answer in time
            recorded_anywhere = self._history is not None or self._checkpoints is not None
            unproven = [s for s in symbols if s not in proven]
            if unproven and recorded_anywhere:
                raise CannotResume(
                    f"no seq of record for {', '.join(unproven[:5])}: the store has none and "
                    f"the database did not answer ({type(exc).__name__}: {exc})"
                ) from exc
            if recorded_anywhere:
                logger.warning("producer: database not read at resume (%r); store only", exc)
            return {}, {}, {}

    async def _read_records(
        self, symbols: list[str], lost_candles: list[tuple[str, str]]
    ) -> tuple[dict[str, Tick], dict[str, int], dict[tuple[str, str], Candle]]:
        """From the database: the newest tick of each symbol in history, the checkpoints, and
        the newest candles of `lost_candles` (those the store no longer has)."""
        recorded: dict[str, Tick] = {}
        candles: dict[tuple[str, str], Candle] = {}
        if self._history is not None:
            recorded = await self._history.records.read_newest_ticks(symbols)
            if lost_candles:
                candles = await self._history.records.read_newest_candles(lost_candles)
        checkpointed = await self._checkpoints.read() if self._checkpoints is not None else {}
        return recorded, checkpointed, candles

    async def retained_runs(self) -> list[Run]:
        """What the store keeps of every symbol, what the witness saw, and the candles held:
        for the history writer to (re)write at the start of a term."""
        runs = []
        for symbol in [i.symbol for i in self._instruments]:
            ticks = await self._store.read_history(symbol, since=None, limit=BACKFILL_TICKS)
            if self._witness is not None:
                ticks = self._witness.recent(symbol) + ticks
            candles = [
                (interval, self._state.candles[(symbol, interval)])
                for interval in INTERVALS_MS
                if (symbol, interval) in self._state.candles
            ]
            runs.append(Run(symbol, ticks, candles))
        return runs


def _keys(symbols: list[str]) -> list[tuple[str, str]]:
    return [(symbol, interval) for symbol in symbols for interval in INTERVALS_MS]


async def _bounded(work: Awaitable[_T], seconds: float) -> _T:
    """`work`, given `seconds` at most (TimeoutError past them). Never waited for longer,
    nor cancelled: a database call stuck behind a lock ends by its own timeout (the driver's),
    while one cancelled inside SQLAlchemy's aiosqlite adapter can leave a close behind that
    never ends and hangs the event loop's shutdown."""
    task = asyncio.ensure_future(work)
    task.add_done_callback(_ignore_outcome)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        raise TimeoutError(f"no answer within {seconds:.0f} s")
    return task.result()


def _ignore_outcome(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()
