"""The fan-out hub: one broker subscription per symbol per process, shared by every local
stream. It owns which symbols it passes on (`follow`, `unfollow`: instruments come and go
while it runs) and who is subscribed to what (`attach`, `detach`), and wires the parts
together.

Where a tick goes: broker → `Sequencer.on_burst` (app/prices/sequencer.py), called by the
broker with every message of one read from Redis, in that read (no queue, no task switch:
`Broker.subscribe_bursts`), which passes the new ticks on in seq order, refetching a gap from
the store or the database (a gap stored nowhere: `FanoutHub.reset`) → `FanoutHub.deliver`,
then one of three ways, fastest first:
- a *lane* (app/prices/lanes.py): connections subscribed to one symbol that are up to date,
  keeping up and have nothing queued. At the end of the burst `Lanes.write` sends the
  symbol's frames (encoded once) to every lane member from one C loop over descriptors the
  lane holds (`_fanout.c`; members it cannot send to that way are written through their
  transports in a plain Python loop): no per-connection Python call, no state update.
  A member leaves its lane the moment that stops being true (its transport pauses writing, a
  protocol frame queues, it subscribes to more, its token is due, it closes).
- `Outbox.offer` (app/prices/outbox.py) of every other stream subscribed to that symbol, then
  one direct write per connection at the end of the burst (`Outbox.flush`) of the same
  pre-encoded frames; a stream that now qualifies joins its lane (`Lanes.join`);
- or, for a connection that is behind or has protocol frames queued, its writer task
  (app/prices/streams.py).

Ordering and exactly-once per stream come from `seq`: the sequencer passes each tick on once,
in order, and each outbox keeps a per-symbol floor and never enqueues a seq at or below it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping

from app import metrics
from app.broker import Broker, BurstSubscription, price_channel
from app.errors import UnknownSymbol
from app.history.service import History, HistoryUnavailable
from app.prices.lanes import Lanes
from app.prices.outbox import Frame, Outbox
from app.prices.replays import ReplayBudget
from app.prices.sequencer import Sequencer
from app.prices.store import TickStore
from app.prices.ticks import Tick
from app.prices.wire import text_frame

logger = logging.getLogger(__name__)


class FanoutHub:
    """Per symbol, the local streams subscribed to it; the sequencer and the lanes it wires."""

    def __init__(
        self,
        *,
        broker: Broker,
        store: TickStore,
        retention: int,
        history: History | None = None,
        max_lag_ms: int = 50,
        direct_writes: bool = True,
        max_connections: int = 10_000,
        replays: ReplayBudget | None = None,
    ) -> None:
        self._broker = broker
        self._store = store
        self._retention = retention
        # Resumes and gap repairs read the window, and the database beyond it.
        self._history = history or History(store=store, sessions=None, retention=retention)
        self.replays = replays or ReplayBudget()
        self._latest: dict[str, Tick] = {}  # the newest tick passed on, per symbol
        self.sequencer = Sequencer(
            store=store,
            retention=retention,
            max_lag_ms=max_lag_ms,
            deliver=self.deliver,
            history=self._history,
            reset=self.reset,
            newest=self._latest,
        )
        self.lanes = Lanes(
            last_seq=self.sequencer.last_seq,
            stop_offering=self._stop_offering,
            offer_again=self._offer_again,
            direct_writes=direct_writes,
            max_connections=max_connections,
        )
        # Per symbol, every subscriber not on a lane: each is offered every tick.
        self._streams: dict[str, set[Outbox]] = {}
        self._followed: dict[str, None] = {}  # the symbols passed on, in the order followed
        self._subscription: BurstSubscription | None = None  # while `consume` runs
        self._reconciling = asyncio.Lock()  # one change of the subscription at a time
        self._last_delivery: float | None = None  # monotonic time of the newest

    def last_tick_age(self) -> float | None:
        """Seconds since a tick was last passed on (None: none yet): the feed's pulse."""
        return None if self._last_delivery is None else time.monotonic() - self._last_delivery

    @property
    def latest_passed_on(self) -> Mapping[str, Tick]:
        """The newest tick passed on per followed symbol (read-only): a producer in this
        process takes it as proof of what was published (app/feed/producer.py)."""
        return self._latest

    @property
    def subscription_count(self) -> int:
        return sum(len(s) for s in self._streams.values()) + self.lane_count

    @property
    def lane_count(self) -> int:
        """Subscriptions on the fast path."""
        return self.lanes.member_count

    @property
    def symbols(self) -> list[str]:
        """The symbols this hub passes on (`follow`, `unfollow`)."""
        return list(self._followed)

    async def consume(self) -> None:
        """Pass every tick of the followed symbols from the broker to the local streams, until
        cancelled; symbols followed or unfollowed meanwhile are taken on or off as it runs.

        What goes wrong while passing ticks on ends this coroutine with its exception, so its
        supervisor logs it and subscribes afresh."""
        failed = self.sequencer.start(self.symbols)
        try:
            async with self._broker.subscribe_bursts(
                self.sequencer.channels, self.sequencer.on_burst
            ) as subscription:
                self._subscription = subscription
                await self._reconcile()  # what was (un)followed while it subscribed
                await failed
        finally:
            self._subscription = None
            self.sequencer.stop()

    async def follow(self, symbols: Iterable[str]) -> None:
        """Pass `symbols` on too (at startup; then instruments added while running). While
        `consume` runs they are subscribed on the broker before this returns, one channel
        each: the symbols followed already go on untouched, with no gap and no duplicate."""
        new = [s for s in symbols if s not in self._followed]
        if new:
            self._followed.update(dict.fromkeys(new))
            await self._reconcile()

    async def unfollow(self, symbols: Iterable[str]) -> None:
        """Pass nothing more of `symbols` on, from before this first awaits (an instrument
        disabled); `attach` refuses them from then on. The streams subscribed to them are
        their owners' to end (`StreamRegistry.withdraw`, app/prices/streams.py)."""
        gone = [s for s in symbols if s in self._followed]
        if not gone:
            return
        for symbol in gone:
            del self._followed[symbol]
            self._latest.pop(symbol, None)  # not a snapshot for a later re-activation
        self.sequencer.drop(gone)
        await self._reconcile()

    async def _reconcile(self) -> None:
        """Bring the live broker subscription to the followed symbols: take on the new ones
        (the sequencer first, so their first message is not refused), leave the gone ones.
        Without one, `consume` subscribes to them all when it (re)starts."""
        async with self._reconciling:
            subscription = self._subscription
            if subscription is None:
                return
            wanted = {price_channel(s): s for s in self._followed}
            taken = set(subscription.channels)
            new = [s for channel, s in wanted.items() if channel not in taken]
            if new:
                self.sequencer.take(new)
                await subscription.add([price_channel(s) for s in new])
            gone = [channel for channel in taken if channel not in wanted]
            if gone:
                await subscription.remove(gone)

    def deliver(self, ticks: list[Tick]) -> None:
        """Hand new ticks, in order, to every subscriber (the sequencer's callback); then write
        what the run gave each connection."""
        dirty: list[Outbox] = []
        pending: dict[str, list[tuple[Tick, bytes]]] = {}
        self._last_delivery = time.monotonic()
        streams, lanes, latest = self._streams, self.lanes.by_symbol, self._latest
        try:
            for tick in ticks:
                symbol = tick.symbol
                latest[symbol] = tick
                outboxes = streams.get(symbol)
                lane = lanes.get(symbol)
                in_lanes = lane is not None and bool(lane[0].members or lane[1].members)
                if not outboxes and not in_lanes:
                    continue
                wire = text_frame(tick.frame.encode())  # encoded once, written to every one
                if in_lanes:
                    pending.setdefault(symbol, []).append((tick, wire))  # written in `_flush`
                if outboxes:
                    for outbox in outboxes:
                        if outbox.offer(tick, wire):
                            dirty.append(outbox)
        except BaseException:
            # What comes after the tick that failed was not passed on: refetched after the
            # restart (found here, not counted in the loop, which runs for every tick).
            self.sequencer.rewind(ticks[ticks.index(tick) + 1 :])
            raise
        finally:
            self._flush(dirty, pending)

    def _flush(self, dirty: list[Outbox], pending: dict[str, list[tuple[Tick, bytes]]]) -> None:
        """Write what the run gave each connection: lanes first, then the corked outboxes,
        which join their lane if they now qualify."""
        if not pending and not dirty:
            return
        now = time.time()
        sent = 0
        error: Exception | None = None
        try:
            if pending:
                sent = self.lanes.write(pending, now)
        except Exception as exc:  # noqa: BLE001 - raised below, once every cork is written
            error = exc
        join = self.lanes.join
        for outbox in dirty:
            try:
                written = outbox.flush(now)
                if written:
                    sent += written
                    join(outbox, now)
            except Exception as exc:  # noqa: BLE001 - raised below, once every cork is written
                error = error or exc
        if sent:
            metrics.MESSAGES_SENT.inc(sent)
        if error is not None:
            raise error

    def _stop_offering(self, outbox: Outbox, symbol: str) -> bool:
        """`Lanes.join`'s callback: a lane takes over `outbox`'s ticks of `symbol`."""
        streams = self._streams.get(symbol)
        if streams is None or outbox not in streams:
            return False
        streams.discard(outbox)
        return True

    def _offer_again(self, outbox: Outbox, symbol: str) -> None:
        """`Lanes.leave`'s callback: `outbox` is offered every tick of `symbol` again."""
        self._streams.setdefault(symbol, set()).add(outbox)

    async def attach(self, outbox: Outbox, symbol: str, *, since: int | None, subject: str) -> None:
        """Subscribe `outbox` to `symbol`: a snapshot (or the stored ticks after `since`, if
        token subject `subject`'s replay budget allows them: app/prices/replays.py), then
        every live tick, with no gap and no duplicate between the two. A `since` this feed
        never reached, or a gap after it stored nowhere, gets a `reset` snapshot. UnknownSymbol
        for a symbol this hub does not follow (one disabled since the caller resolved it)."""
        if outbox.closed:
            return
        if symbol not in self._followed:  # disabled after the caller resolved it
            raise UnknownSymbol(f"unknown symbol: {symbol!r}")
        outbox.leave_lane()  # a second symbol: its ticks are corked together from now on
        outbox.begin_sync(symbol)
        self._streams.setdefault(symbol, set()).add(outbox)
        metrics.SUBSCRIPTIONS.inc()
        initial: list[Frame] = []
        floor, first_live_is_snapshot = since or 0, since is None
        try:
            # The newest tick this hub passed on is the snapshot: no store round trip, so a
            # reconnect storm costs Redis nothing. The store is asked before any tick, and
            # when a resume point is ahead of this hub (it lags, or the client came from a
            # faster instance).
            latest = self._latest.get(symbol)
            if latest is None or (since is not None and since > latest.seq):
                latest = (await self._store.read_latest([symbol])).get(symbol) or latest
            if latest is None:  # no tick yet: the first live one is the snapshot (or a reset)
                floor, first_live_is_snapshot = 0, True
            else:
                if since is not None and since < latest.seq:
                    # Priced before anything is read: past the budget, a snapshot instead.
                    if not self.replays.take(subject, latest.seq - since):
                        since = None
                if since is None:  # no resume point, or no budget for it
                    initial = [Frame(symbol, latest.seq, latest.snapshot_frame, "snapshot")]
                    floor, first_live_is_snapshot = 0, False
                elif since > latest.seq:
                    # A seq this feed never reached: it restarted below the client's.
                    metrics.RESETS.labels(where="resume").inc()
                    initial = [Frame(symbol, latest.seq, latest.reset_frame, "reset")]
                    floor, first_live_is_snapshot = 0, False
                elif since < latest.seq:
                    initial = await self._replay(symbol, since=since, upto=latest)
        finally:
            outbox.end_sync(
                symbol,
                initial,
                floor=floor,
                first_live_is_snapshot=first_live_is_snapshot,
                since=since,
            )
            if outbox.closed:  # its stream closed while the store answered
                self.detach(outbox, [symbol])

    async def _replay(self, symbol: str, *, since: int, upto: Tick) -> list[Frame]:
        """The ticks after `since` up to `upto` (the latest), from the window and the database
        beyond it. A seq stored in neither is lost for good: the tick after it is a `reset`
        snapshot, and so is `upto` if nothing at all after `since` is stored. Without the
        database (down), what the window has, with a plain `seq` jump: those ticks may be
        readable later from `/history`."""
        wanted = upto.seq - since
        try:
            ticks = await self._history.ticks_after(symbol, since=since, limit=wanted)
        except HistoryUnavailable as exc:
            logger.warning("hub: resume of %s from %d read the window only: %s", symbol, since, exc)
            ticks = await self._store.read_history(symbol, since=since, limit=wanted)
            return [Frame(t.symbol, t.seq, t.frame, "replay") for t in ticks]
        if not ticks:
            metrics.RESETS.labels(where="resume").inc()
            return [Frame(symbol, upto.seq, upto.reset_frame, "reset")]
        frames, last = [], since
        for t in ticks:
            if t.seq == last + 1:
                frames.append(Frame(t.symbol, t.seq, t.frame, "replay"))
            else:
                metrics.RESETS.labels(where="resume").inc()
                frames.append(Frame(t.symbol, t.seq, t.reset_frame, "reset"))
            last = t.seq
        return frames

    def reset(self, tick: Tick) -> None:
        """The sequencer's callback: `tick`'s symbol starts afresh at `tick`, after ticks the
        store and the database do not have, or with a seq that went back. Every subscriber
        gets it as a `reset` snapshot (off its lane first: a lane writes ticks only), then
        its ticks from there on the per-tick path, until each qualifies for a lane again."""
        symbol = tick.symbol
        self._latest[symbol] = tick
        self._last_delivery = time.monotonic()
        metrics.RESETS.labels(where="live").inc()
        for lane in self.lanes.by_symbol.get(symbol, ()):
            for outbox in list(lane.members):
                outbox.leave_lane()
        for outbox in list(self._streams.get(symbol, ())):
            outbox.reset(tick)

    def detach(self, outbox: Outbox, symbols: Iterable[str]) -> None:
        outbox.leave_lane()
        for symbol in list(symbols):
            streams = self._streams.get(symbol)
            if streams is not None and outbox in streams:
                streams.discard(outbox)
                metrics.SUBSCRIPTIONS.dec()
            outbox.remove(symbol)
