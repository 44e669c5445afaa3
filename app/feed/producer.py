"""The producer loop: quotes from a source become ticks (ts, seq, candles), are kept in the
store, then published on `prices:{SYMBOL}` through the broker. Only the lease holder runs it.

Whatever the source (app/feed/sources/), this is the one writer of `seq`: a batch's quotes go
out in order per symbol, and the symbols of a batch concurrently. Pushed quotes
(`POST /v1/ingest`) come from the inbox (app/feed/inbox.py), beside the source, one batch at a
time with the source's: each tick of a pushed quote is written with the quote's inbox position
as its symbol's mark, so a successor resumes at exactly the next quote."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from contextlib import aclosing
from typing import Any, Protocol

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from app import metrics
from app.backoff import Backoff
from app.broker import Broker, price_channel
from app.config import Settings
from app.feed.checkpoints import SeqCheckpoints
from app.feed.inbox import Inbox, InboxEntry, Position
from app.feed.resume import CannotResume, FeedState, SeqOfRecord
from app.feed.sources import Instruments, Quote, TickSource, create_source
from app.feed.stamping import Stamper
from app.feed.stats import FeedCounts, FeedStats, MemoryFeedCounts
from app.feed.term import Term
from app.feed.witness import Witness
from app.feed.writes import BatchWrites
from app.history.writer import HistoryWriter
from app.prices.store import NotLeader, TickStore

logger = logging.getLogger(__name__)


class Lease(Protocol):
    renew_interval: float

    @property
    def token(self) -> str | None:
        """The fence for store writes (None: no fencing, one process)."""

    async def acquire(self) -> bool: ...

    async def renew(self) -> bool: ...

    async def release(self) -> None: ...


CHECKPOINT_SECONDS = 2.0
RETRY_CAP_SECONDS = 5.0
STATS_SECONDS = 1.0
# Pushed quotes written in one store call at most: a write runs as one Lua script, during
# which Redis serves nobody else (2,000 ticks: a few milliseconds).
MAX_QUOTES_PER_WRITE = 2000
# Source batches read while the previous ones are written: enough to keep the source busy
# during a write, few enough that a leadership that ends drops little already read.
READ_AHEAD_BATCHES = 2
# Source batches being written at once when the source is ahead: one whose write is in Redis
# (or being published) while the next ones are stamped and sent (app/feed/stamping.py).
IN_FLIGHT_BATCHES = 3


class LostLease(Exception):
    pass


class Producer:
    def __init__(
        self,
        *,
        source: TickSource,
        instruments: Instruments,
        store: TickStore,
        broker: Broker,
        lease: Lease,
        checkpoints: SeqCheckpoints | None = None,
        checkpoint_margin: int = 0,
        stats: FeedStats | None = None,
        counts: FeedCounts | None = None,
        inbox: Inbox | None = None,
        ingest_stats: FeedStats | None = None,
        history: HistoryWriter | None = None,
        witness: Witness | None = None,
    ) -> None:
        self._source = source
        # Published ticks go to the database through it (app/history/writer.py).
        self._history = history
        self._inbox = inbox
        self._checkpoints = checkpoints
        self._instruments = instruments  # live: instruments come and go while it runs
        self._stats = stats or FeedStats(source.name)
        # Pushed quotes skipped by the producer (a symbol disabled since the push) count
        # under the source `ingest`; FEED_SOURCE=ingest: the same counts.
        self._ingest_stats = ingest_stats or (
            self._stats if self._stats.source == "ingest" else FeedStats("ingest")
        )
        self._counts = counts or MemoryFeedCounts()
        self._store = store
        self._broker = broker
        self._lease = lease
        self._state = FeedState()
        self._record = SeqOfRecord(
            self._state,
            store=store,
            instruments=instruments,
            witness=witness,
            history=history,
            checkpoints=checkpoints,
            checkpoint_margin=checkpoint_margin,
        )
        self._stamper = Stamper(self._state)
        # One batch at a time is stamped and its write sent (the source's and pushed ones):
        # seq order per symbol. Each batch is published once the one before it is: whether
        # the last batch stamped was (True), or failed to be (False).
        self._emitting = asyncio.Lock()
        self._published: asyncio.Future[bool] = _settled_future(True)
        self._writes = BatchWrites(store, broker, history)  # each names the one before it
        self.is_leader = False

    @property
    def stats(self) -> FeedStats:
        return self._stats

    async def settled(self) -> None:
        """After `run` ended: every batch Redis may have published reached history (writes.py)."""
        await self._writes.settled()

    async def run(self) -> None:
        # Waiting for another instance's lease to lapse is polling, every renew_interval: a
        # standby must take over within one lease, so that wait never grows. Failures back
        # off (jittered, so a cluster that lost Redis together does not return together):
        # Redis unreachable, and a leadership that ended early (a store that keeps failing
        # would otherwise be retried every renew_interval for as long as it fails).
        interval = self._lease.renew_interval
        unreachable = Backoff(base=0.2, cap=RETRY_CAP_SECONDS)
        lead_again = Backoff(base=interval, cap=max(interval, RETRY_CAP_SECONDS))
        while True:
            try:
                acquired = await self._lease.acquire()
            except RedisError as exc:
                delay = unreachable.next_delay()
                logger.warning(
                    "producer: cannot reach Redis for the lease (%s); retrying in %.1fs",
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            unreachable.reset()
            if not acquired:
                await asyncio.sleep(interval)
                continue
            self.is_leader = True
            metrics.PRODUCER_LEADER.set(1)
            logger.info(
                "producer: this instance leads; source %s, %d symbols",
                self._source.name,
                len(list(self._instruments)),
            )
            led_from = time.monotonic()
            try:
                await self._lead()
            except* (LostLease, NotLeader):
                logger.warning("producer: lease lost; standing by")
            except* CannotResume as group:
                logger.error("producer: %s; standing by", _first_error(group))
            except* RedisError as group:
                logger.warning("producer: Redis error (%s); standing by", _first_error(group))
            finally:
                self.is_leader = False
                metrics.PRODUCER_LEADER.set(0)
            await self._lease.release()
            await lead_again.sleep(ran_for=time.monotonic() - led_from)

    async def _lead(self) -> None:
        self._record.new_term()
        self._stamper.new_term()
        self._published = _settled_future(True)
        self._writes.new_term()
        await self._record.resume([i.symbol for i in self._instruments])
        try:
            async with Term() as group:  # its end is bounded: app/feed/term.py
                group.create_task(self._keep_lease(), name="producer-lease")
                group.create_task(self._publish_forever(), name="producer-publish")
                group.create_task(self._report_forever(), name="producer-stats")
                if self._checkpoints is not None:
                    group.create_task(self._checkpoint_forever(), name="producer-checkpoint")
                if self._inbox is not None:
                    group.create_task(self._apply_inbox_forever(), name="producer-inbox")
                if self._history is not None:
                    group.create_task(
                        self._history.run(backfill=self._record.retained_runs),
                        name="producer-history",
                    )
        finally:
            await self._report()

    async def _report_forever(self) -> None:
        while True:
            await asyncio.sleep(STATS_SECONDS)
            await self._report()

    async def _report(self) -> None:
        """Hand the counts on to where every instance's /metrics reads them."""
        for stats in {id(s): s for s in (self._stats, self._ingest_stats)}.values():
            counts = stats.drain()
            if not counts:
                continue
            try:
                await self._counts.add(counts)
            except Exception as exc:  # noqa: BLE001 - kept, and added with the next ones
                logger.debug("producer: feed counts not reported yet (%s)", exc)
                stats.restore(counts)

    async def _checkpoint_forever(self) -> None:
        assert self._checkpoints is not None
        while True:
            await asyncio.sleep(CHECKPOINT_SECONDS)
            try:
                await self._checkpoints.write(dict(self._state.seq))
            except Exception as exc:  # noqa: BLE001 - the next checkpoint tries again
                logger.warning("producer: seq checkpoint failed (%s)", exc)

    async def _keep_lease(self) -> None:
        while True:
            await asyncio.sleep(self._lease.renew_interval)
            try:
                renewed = await self._lease.renew()
            except RedisConnectionError as exc:
                raise LostLease from exc
            if not renewed:
                raise LostLease

    async def _publish_forever(self) -> None:
        """The source read one step ahead of the writes: while a batch is in Redis, the next
        is read (a replay row parsed, an upstream message taken); what waited meanwhile is
        written together, as one batch, so a busy source costs fewer round trips a tick."""
        ready: asyncio.Queue[list[Quote]] = asyncio.Queue(maxsize=READ_AHEAD_BATCHES)

        async def read() -> None:
            async for batch in self._source.stream(self._instruments, dict(self._state.prices)):
                if batch:
                    await ready.put(batch)

        async def write() -> None:
            # Batches in flight: the next stamped and sent while the earlier are written and
            # published (`_emit_marked` keeps them in order).
            in_flight: list[asyncio.Task[None]] = []
            try:
                while True:
                    behind = not ready.empty()
                    batch = await ready.get()
                    while not ready.empty() and len(batch) < MAX_QUOTES_PER_WRITE:
                        batch = batch + ready.get_nowait()
                    if not behind:  # the source is the slower: no task of its own
                        while in_flight:
                            await in_flight.pop(0)
                        await self.emit_batch(batch)
                        continue
                    in_flight.append(asyncio.create_task(self.emit_batch(batch)))
                    if len(in_flight) == IN_FLIGHT_BATCHES:
                        await in_flight.pop(0)
            finally:  # the term ends: what is still in flight goes no further
                for task in in_flight:
                    task.cancel()
                await asyncio.gather(*in_flight, return_exceptions=True)

        async with asyncio.TaskGroup() as group:  # the source's failure ends both
            group.create_task(read(), name="producer-source")
            group.create_task(write(), name="producer-write")

    async def _apply_inbox_forever(self) -> None:
        """Pushed batches, in the order they were accepted. This term starts from the marks
        the store kept: quotes at or before their symbol's mark went out already."""
        assert self._inbox is not None
        marks: dict[str, Position] = {}
        for symbol, raw in (await self._store.read_marks()).items():
            position = Position.decode(raw)
            if position is not None:
                marks[symbol] = position
        async with aclosing(self._inbox.read()) as arrivals:
            async for entries in arrivals:
                for group in _groups_of_at_most(entries, MAX_QUOTES_PER_WRITE):
                    await self._apply_entries(group, marks)
                    await self._inbox.ack([entry.id for entry in group])

    async def _apply_entries(
        self, entries: Sequence[InboxEntry], marks: dict[str, Position]
    ) -> None:
        """Entries that arrived together, in one write: one store call and one publish for
        all of them, which is what lets one producer keep up with many small pushes."""
        pending: list[tuple[Quote, str | None]] = []
        for entry in entries:
            pending += self._fresh_quotes(entry, marks)
        if pending:
            await self._emit_marked(pending)

    def _fresh_quotes(
        self, entry: InboxEntry, marks: dict[str, Position]
    ) -> list[tuple[Quote, str | None]]:
        """The quotes of `entry` not published yet, each with its mark."""
        pending: list[tuple[Quote, str | None]] = []
        for index, quote in enumerate(entry.quotes):
            position = entry.position(index)
            applied = marks.get(quote.symbol)
            if applied is not None and position <= applied:
                continue  # a previous leader published it
            if quote.symbol not in self._instruments:
                self._ingest_stats.reject(
                    "inactive_symbol", f"{quote.symbol} was disabled after the push"
                )
                continue
            pending.append((quote, position.encode()))
            marks[quote.symbol] = position
        return pending

    async def emit_batch(self, quotes: Sequence[Quote]) -> None:
        """Stamp, store and publish `quotes`: in order within a symbol, symbols concurrently."""
        await self._emit_marked([(quote, None) for quote in quotes])

    async def _emit_marked(self, quotes: Sequence[tuple[Quote, str | None]]) -> None:
        """`emit_batch`, each quote with the inbox mark its tick is stored with (or None).

        One store write for the whole batch (one Lua call: every symbol's ticks, candles and
        marks, fenced), then one publish round trip: the cost of a batch barely grows with
        its size. Batches are stamped one at a time, in order; with a store that applies
        writes in call order (`ordered_writes`) the next batch is stamped and its write sent
        while this one's is in Redis (app/feed/stamping.py). A batch is taken as written,
        then published, only once its write answered and the batch before it was published:
        if any of them failed, nothing after it goes out this term."""
        by_symbol: dict[str, list[tuple[Quote, str | None]]] = {}
        for quote, mark in quotes:
            by_symbol.setdefault(quote.symbol, []).append((quote, mark))
        written: asyncio.Future[list[int]] | None = None
        done: asyncio.Future[bool] | None = None
        publishes_written = self._writes.publish  # the write publishes its own ticks
        try:
            async with self._emitting:
                await self._record.resume(list(by_symbol))  # an instrument added this term
                runs = [self._stamper.stamp(symbol, run) for symbol, run in by_symbol.items()]
                before, done = self._published, asyncio.get_running_loop().create_future()
                self._published = done
                written = asyncio.ensure_future(self._writes.send(runs, fence=self._lease.token))
                if not self._store.ordered_writes:  # the next one is sent once this answered
                    await _settled(written)
            skipped = await asyncio.shield(written)  # a cancel here leaves it to `abandon`
            if not await before:
                # What this batch follows never went out: publishing it would hide that gap.
                raise RedisConnectionError("an earlier batch of this term was not published")
            published: list[tuple[str, str]] = []
            for run, refused in zip(runs, skipped, strict=True):
                self._state.take_run(run, by_symbol[run.symbol][-1][0].price)
                if not publishes_written:
                    channel = price_channel(run.symbol)
                    published += [(channel, tick.frame) for tick in run.ticks[refused:]]
            if publishes_written:  # published by the write itself
                metrics.TICKS_PUBLISHED.inc(sum(len(r.ticks) for r in runs) - sum(skipped))
            else:
                # The store first: a tick the broker loses can still be refetched from it.
                await self._broker.publish_many(published)
                metrics.TICKS_PUBLISHED.inc(len(published))
            if self._history is not None:
                self._history.offer(runs)
        except BaseException as exc:
            if written is not None:
                stopping = isinstance(exc, asyncio.CancelledError)
                self._writes.abandon(written, runs, stopping=stopping)
            if done is not None:
                done.set_result(False)
            raise
        assert done is not None
        done.set_result(True)


def _groups_of_at_most(entries: list[InboxEntry], quotes: int) -> list[list[InboxEntry]]:
    """`entries` in order, in groups of at most `quotes` quotes (an entry is never split; a
    larger one is a group of its own)."""
    groups: list[list[InboxEntry]] = []
    size = quotes
    for entry in entries:
        if size + len(entry.quotes) > quotes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += len(entry.quotes)
    return groups


def _settled_future(outcome: bool) -> asyncio.Future[bool]:
    future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    future.set_result(outcome)
    return future


async def _settled(task: asyncio.Future[Any]) -> None:
    """Wait until `task` is done, whatever its outcome (that is awaited later)."""
    await asyncio.wait({task})


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first error itself, however deep task groups nested it."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def create_producer(
    settings: Settings,
    *,
    instruments: Instruments,
    store: TickStore,
    broker: Broker,
    lease: Lease,
    checkpoints: SeqCheckpoints | None = None,
    counts: FeedCounts | None = None,
    inbox: Inbox | None = None,
    history: HistoryWriter | None = None,
    witness: Witness | None = None,
) -> Producer:
    """The producer of the source FEED_SOURCE names; SourceNotReady if it cannot start."""
    stats = FeedStats(settings.feed_source)
    source = create_source(settings, stats)
    # At most this many ticks of a symbol can follow its last checkpoint before a successor
    # takes over: two checkpoint periods and a lease. Used only when the newest published
    # tick cannot be proven (app/feed/resume.py).
    window = 2 * CHECKPOINT_SECONDS + settings.leader_lease_ms / 1000
    return Producer(
        source=source,
        instruments=instruments,
        store=store,
        broker=broker,
        lease=lease,
        checkpoints=checkpoints,
        checkpoint_margin=math.ceil(settings.feed_ticks_per_second * window) + 1,
        stats=stats,
        counts=counts,
        inbox=inbox,
        history=history,
        witness=witness,
    )
