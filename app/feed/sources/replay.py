"""FEED_SOURCE=replay: the rows of a CSV file, paced by their own timestamps.

The file (FEED_REPLAY_PATH) has a header row naming its columns, in any order: `ts`, `symbol`,
`price`, and optionally `bid`, `ask`, `volume`, `size`, `side`; other columns are ignored.
`ts` is epoch milliseconds or ISO 8601 (without an offset: UTC). `create` reads the header
before anything starts, so a missing file or a file without one refuses to start with one
line; the rows are then read lazily, one pass at a time, so a file may be any size.

Pacing: a row goes out (ts − previous ts) / FEED_REPLAY_SPEED seconds after the one before,
scheduled from the start on the loop's monotonic clock (`Pacer`). Rows with the same ts go
out in one batch; a ts that goes backwards goes out at once (the file's order is the truth).
Speed 0 sends rows as fast as the producer takes them, in batches of `BATCH_ROWS`.

A row that cannot become a tick (a bad ts, an instrument that is not active at that moment,
a bad price, too many decimals, a bad side, the wrong number of fields) is counted under its
reason (`pricefeed_feed_rejected_total{source="replay",reason}`) and skipped.

With FEED_REPLAY_LOOP the file plays again from the top at its end. Each pass moves
`source_ts` forward by the previous pass's span (its latest ts − its earliest) plus the
median gap between its rows, so `source_ts` never goes back from one pass to the next, and
the first row of a pass follows the last row of the one before after that median gap.

Each `stream` starts at the top of the file: a producer that leads again (after a failover,
on this instance or another) replays the file from its first row.
"""

from __future__ import annotations

import asyncio
import csv
import logging
import statistics
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from app.feed.quotes import QuoteError, parse_amount, parse_price, parse_side
from app.feed.sources import Instruments, Quote, SourceNotReady

if TYPE_CHECKING:
    import _csv

    from app.config import Settings
    from app.feed.stats import FeedStats

logger = logging.getLogger("app.feed")

REQUIRED_COLUMNS = ("ts", "symbol", "price")
OPTIONAL_COLUMNS = ("bid", "ask", "volume", "size", "side")
# Speed 0: rows per batch, and at any speed the rows read (kept or skipped) between two
# chances for the event loop to run something else.
BATCH_ROWS = 500
# Late by more than this, the source is behind for a reason of its own (a stall, a slow
# producer): it carries on from now instead of bursting to catch up.
STALL_SECONDS = 0.5
# A looping file whose rows all share one ts plays again this long after itself.
DEFAULT_GAP_MS = 1000
# The gaps a pass keeps to find its median: enough for a good estimate, bounded for any file.
GAP_SAMPLE = 10_000
# A file that became unreadable while playing is tried again this often.
RETRY_SECONDS = 5.0

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_MAX_EPOCH_DIGITS = 16


def create(settings: Settings, stats: FeedStats) -> ReplaySource:
    """The replay of FEED_REPLAY_PATH; SourceNotReady unless it is a readable file with a
    header naming ts, symbol and price."""
    path = Path(settings.feed_replay_path)
    with open_replay(path, shown_as=settings.feed_replay_path):
        pass
    return ReplaySource(
        path=path,
        shown_as=settings.feed_replay_path,
        speed=settings.feed_replay_speed,
        loop=settings.feed_replay_loop,
        stats=stats,
    )


@dataclass(frozen=True, slots=True)
class Columns:
    """Where each known column is in a row, and how many fields a row has."""

    width: int
    index: dict[str, int]

    @classmethod
    def from_header(cls, header: list[str], *, where: str) -> Columns:
        names = [name.strip().lower() for name in header]
        known = set(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)
        index: dict[str, int] = {}
        for position, name in enumerate(names):
            if name in index:
                raise SourceNotReady(f"{where}: the header names the column {name!r} twice")
            if name in known:
                index[name] = position
        if not index:
            first = ",".join(header)[:60]
            raise SourceNotReady(
                f"{where}: no header row: the first line must name the columns "
                f"(ts,symbol,price and optionally {','.join(OPTIONAL_COLUMNS)}), "
                f"not {first!r}"
            )
        missing = [name for name in REQUIRED_COLUMNS if name not in index]
        if missing:
            raise SourceNotReady(
                f"{where}: the header has no {', '.join(missing)} column "
                f"(it needs ts, symbol and price; it has {', '.join(index)})"
            )
        return cls(width=len(header), index=index)


class ReplayFile:
    """An open replay file past its header: its rows, with their line numbers."""

    def __init__(self, file: TextIO, reader: _csv.Reader, columns: Columns) -> None:
        self._file = file
        self._reader = reader  # the one that read the header: line_num counts from there
        self.columns = columns

    def __enter__(self) -> ReplayFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def rows(self) -> Iterator[tuple[int, list[str] | csv.Error]]:
        """(line number, fields) per row, or the csv module's error for a row it cannot
        split; blank lines are left out."""
        while True:
            try:
                fields = next(self._reader)
            except StopIteration:
                return
            except csv.Error as exc:  # a field past csv's size limit, say: that row only
                yield self._reader.line_num, exc
                continue
            if fields:
                yield self._reader.line_num, fields


def open_replay(path: Path, *, shown_as: str) -> ReplayFile:
    """Open the file and read its header; SourceNotReady, in one line, if either fails."""
    where = f"FEED_REPLAY_PATH={shown_as}"
    try:
        # utf-8-sig: a spreadsheet's byte order mark is not part of the first column's name.
        # errors="replace": a bad byte spoils its row (counted and skipped), not the replay.
        file = path.open(encoding="utf-8-sig", errors="replace", newline="")
    except FileNotFoundError:
        raise SourceNotReady(f"{where}: no such file") from None
    except IsADirectoryError:
        raise SourceNotReady(f"{where}: is a directory, not a CSV file") from None
    except PermissionError:
        raise SourceNotReady(f"{where}: cannot read it (permission denied)") from None
    except OSError as exc:
        raise SourceNotReady(f"{where}: cannot read it ({exc.strerror or exc})") from None
    try:
        reader = csv.reader(file)
        header = next(reader, None)
        if header is None:
            raise SourceNotReady(
                f"{where}: the file is empty (it needs a header row: ts,symbol,price)"
            )
        columns = Columns.from_header(header, where=where)
    except SourceNotReady:
        file.close()
        raise
    except (OSError, csv.Error) as exc:
        file.close()
        raise SourceNotReady(f"{where}: cannot read its header ({exc})") from None
    return ReplayFile(file, reader, columns)


def parse_ts(raw: str) -> int:
    """Epoch milliseconds, from epoch milliseconds or ISO 8601 (naive: UTC)."""
    text = raw.strip()
    whole, point, fraction = text.partition(".")
    if (
        text.isascii()
        and whole.isdigit()
        and len(whole) <= _MAX_EPOCH_DIGITS
        and (not point or fraction.isdigit())
    ):
        return int(whole)  # a fraction of a millisecond (a database's numeric export) dropped
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise QuoteError(
            "bad_ts", f"ts must be epoch milliseconds or ISO 8601, not {text[:40]!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    ms = (moment - _EPOCH) // _MS
    if ms < 0:
        raise QuoteError("bad_ts", f"ts is before 1970: {text[:40]!r}")
    return ms


class Pacer:
    """When each row goes out, on a monotonic clock: (ts − previous ts) / speed after the row
    before, scheduled from the first row rather than from whenever the last sleep ended, so
    that small delays do not add up over a long file. A row that goes out more than
    `STALL_SECONDS` late (the producer was held up) moves the schedule to now: the rows after
    it keep their spacing instead of rushing out to catch up. Speed 0: every row is due at
    once."""

    def __init__(self, speed: float, clock: Callable[[], float]) -> None:
        self._speed = speed
        self._clock = clock
        self._due: float | None = None
        self._last_ts = 0

    def schedule(self, ts: int) -> None:
        """The row stamped `ts` (epoch ms) is next."""
        if self._speed == 0:
            return
        if self._due is None:
            self._due = self._clock()
        else:
            self._due += max(ts - self._last_ts, 0) / 1000 / self._speed
        self._last_ts = ts

    def wait(self) -> float:
        """Seconds until the next row is due; 0 if it is due already."""
        return 0.0 if self._due is None else max(self._due - self._clock(), 0.0)

    def going_out(self) -> None:
        """The next row goes out now."""
        if self._due is not None and self._clock() - self._due > STALL_SECONDS:
            self._due = self._clock()


@dataclass
class PassTally:
    """What one pass through the file saw: rows sent and skipped, and the timeline of its
    rows with a valid ts (for where the next pass starts)."""

    sent: int = 0
    skipped: int = 0
    last_ts: int | None = None
    min_ts: int | None = None
    max_ts: int | None = None
    gaps: list[int] = field(default_factory=list)

    def saw(self, ts: int) -> None:
        if self.last_ts is not None and ts > self.last_ts and len(self.gaps) < GAP_SAMPLE:
            self.gaps.append(ts - self.last_ts)
        self.last_ts = ts
        self.min_ts = ts if self.min_ts is None else min(self.min_ts, ts)
        self.max_ts = ts if self.max_ts is None else max(self.max_ts, ts)

    @property
    def advance_ms(self) -> int:
        """How far `source_ts` moves for the next pass: this pass's span, plus its median
        gap (DEFAULT_GAP_MS if all its rows share one ts)."""
        if self.min_ts is None or self.max_ts is None:
            return DEFAULT_GAP_MS
        gap = int(statistics.median_low(self.gaps)) if self.gaps else DEFAULT_GAP_MS
        return self.max_ts - self.min_ts + gap


class ReplaySource:
    name = "replay"

    def __init__(
        self,
        *,
        path: Path,
        shown_as: str,
        speed: float,
        loop: bool,
        stats: FeedStats,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """`clock` (default: the event loop's) and `sleep` are what the pacing waits on."""
        self._path = path
        self._shown_as = shown_as
        self._speed = speed
        self._loop = loop
        self._stats = stats
        self._clock = clock
        self._sleep = sleep

    async def stream(
        self, instruments: Instruments, start_prices: dict[str, Decimal]
    ) -> AsyncIterator[list[Quote]]:
        pacer = Pacer(self._speed, self._clock or asyncio.get_running_loop().time)
        offset = 0
        passes = 0
        unreadable = False  # logged once per spell, not every retry
        logger.info(
            "replay: FEED_REPLAY_PATH=%s at speed %s%s",
            self._shown_as,
            f"{self._speed:g}" if self._speed else "0 (as fast as taken)",
            ", looping" if self._loop else "",
        )
        while True:
            tally = PassTally()
            try:
                async for batch in self._play(instruments, pacer, tally, offset=offset):
                    if unreadable:
                        unreadable = self._readable_again()
                    yield batch
            except SourceNotReady as exc:
                if tally.max_ts is None:  # it could not be opened: it may come back
                    if not unreadable:
                        logger.error("replay: %s; trying every %.0fs", exc, RETRY_SECONDS)
                    unreadable = True
                    await self._sleep(RETRY_SECONDS)
                    continue
                logger.error("replay: %s; that pass ends here", exc)
            if unreadable:
                unreadable = self._readable_again()
            passes += 1
            if not self._loop:
                logger.info("replay finished: %d rows, %d skipped", tally.sent, tally.skipped)
                await _idle()
            if tally.sent == 0:
                logger.warning(
                    "replay: no row of FEED_REPLAY_PATH=%s became a tick in a whole pass "
                    "(%d skipped); idling: the feed reports stale",
                    self._shown_as,
                    tally.skipped,
                )
                await _idle()
            if passes == 1:
                logger.info(
                    "replay: end of FEED_REPLAY_PATH=%s (%d rows, %d skipped); looping, "
                    "source_ts moves on %d ms a pass",
                    self._shown_as,
                    tally.sent,
                    tally.skipped,
                    tally.advance_ms,
                )
            offset += tally.advance_ms

    async def _play(
        self, instruments: Instruments, pacer: Pacer, tally: PassTally, *, offset: int
    ) -> AsyncIterator[list[Quote]]:
        """One pass through the file: batches of quotes, each batch when it is due."""
        batch: list[Quote] = []
        read = 0  # rows read since the event loop last had a turn
        with open_replay(self._path, shown_as=self._shown_as) as replay:
            columns = replay.columns
            for line, fields in _read(replay, self._shown_as):
                if read == BATCH_ROWS:  # a batch's worth read, sent or skipped: breathe
                    if batch:
                        yield batch
                        batch = []
                    await asyncio.sleep(0)
                    read = 0
                read += 1
                try:
                    if isinstance(fields, csv.Error):
                        raise QuoteError("bad_row", f"cannot split the row ({fields})")
                    if len(fields) != columns.width:
                        raise QuoteError(
                            "bad_row", f"{len(fields)} fields, the header has {columns.width}"
                        )
                    ts = parse_ts(fields[columns.index["ts"]])
                except QuoteError as exc:
                    self._skip(tally, exc, line)
                    continue
                tally.saw(ts)
                pacer.schedule(ts + offset)
                if pacer.wait() > 0:
                    if batch:
                        yield batch
                        batch = []
                    wait = pacer.wait()  # what is left after the producer took the batch
                    if wait > 0:
                        await self._sleep(wait)
                    read = 1
                pacer.going_out()
                try:  # now, when it is due: against the instruments active at this moment
                    quote = _quote(fields, columns, instruments, source_ts=ts + offset)
                except QuoteError as exc:
                    self._skip(tally, exc, line)
                    continue
                batch.append(quote)
                tally.sent += 1
        if batch:
            yield batch

    def _readable_again(self) -> bool:
        logger.info("replay: FEED_REPLAY_PATH=%s is readable again", self._shown_as)
        return False

    def _skip(self, tally: PassTally, error: QuoteError, line: int) -> None:
        tally.skipped += 1
        self._stats.reject(error.reason, f"{self._shown_as} line {line}: {error}")


def _read(replay: ReplayFile, shown_as: str) -> Iterator[tuple[int, list[str] | csv.Error]]:
    """The file's rows; a read that fails midway ends the pass as a file that cannot start."""
    try:
        yield from replay.rows()
    except OSError as exc:
        raise SourceNotReady(
            f"FEED_REPLAY_PATH={shown_as}: reading failed ({exc.strerror or exc})"
        ) from None


def _quote(
    fields: list[str], columns: Columns, instruments: Instruments, *, source_ts: int
) -> Quote:
    """The row's quote, checked as every source checks one (app/feed/quotes.py)."""
    index = columns.index
    symbol = fields[index["symbol"]].strip()
    instrument = instruments.get(symbol)
    if instrument is None:
        raise QuoteError("unknown_symbol", f"{symbol[:32]!r} is not an active instrument")
    decimals = instrument.price_decimals

    def optional(name: str) -> str | None:
        raw = fields[index[name]].strip() if name in index else ""
        return raw or None

    bid, ask, volume, size, side = (optional(name) for name in OPTIONAL_COLUMNS)
    return Quote(
        symbol=symbol,
        price=parse_price(fields[index["price"]], decimals),
        bid=None if bid is None else parse_amount(bid, "bid", decimals=decimals),
        ask=None if ask is None else parse_amount(ask, "ask", decimals=decimals),
        volume=None if volume is None else parse_amount(volume, "volume"),
        size=None if size is None else parse_amount(size, "size"),
        side=None if side is None else parse_side(side),
        source_ts=source_ts,
    )


async def _idle() -> None:
    """Nothing more to send: wait until cancelled (ending the stream would make the producer
    start it again from the top)."""
    await asyncio.Event().wait()
