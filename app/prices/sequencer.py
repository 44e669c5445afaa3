"""Broker messages in, ticks out: each tick once, in seq order per symbol, with no silent gap.

The broker hands `Sequencer.on_burst` every message of one read from Redis. The sequencer
decodes them (a malformed message, or one on the wrong channel, is dropped and counted), skips
those of a burst more than `max_lag_ms` older than their symbol's newest (the hub is behind:
a `seq` jump the client sees, instead of latency that grows with the backlog), drops what it
already passed on (a redelivery), and hands the rest, in order, to its `deliver` callback in
one call per run of ticks up to a gap (FanoutHub.deliver, app/prices/hub.py, which writes them
to the streams). A `deliver` that fails partway gives back what it did not pass on (`rewind`).

A seq the broker skipped (a reconnect, a producer crash between store and publish) is a gap:
the ticks before it go on, the sequencer refetches the missing ones from the store, where the
producer wrote them first, or the database beyond it (app/history/service.py), and passes them
on before the tick that revealed the gap. While that refetch awaits, later bursts wait in a
bounded backlog behind it (the oldest leave when it overflows, and the jump they leave behind
is refetched in turn). A refetch that fails leaves a visible `seq` jump; one that answers
without the missing ticks (stored nowhere) hands the tick after them to `reset`, and so does a
seq that went back (lower, yet newer than the last tick passed on, and confirmed by the store),
which would otherwise be dropped as a redelivery until the new run passed the old seq. Both
checks sit off the path of a tick whose seq is the last + 1.

A seq more than the retention ahead of the last passed on is checked with the store first: one
the store does not have (a forged or corrupt message, say `seq: 10**15` published by hand) is
dropped and counted, not taken as the new last seq, which would make every real tick after it
look like a redelivery and freeze the symbol. A symbol's first tick is held to the store's
latest seq (read at `start`) plus the retention.

The symbols it takes can change while it runs (`take`, `drop`: instruments added or
disabled); the others' ticks go on as before. It owns `last_seq`, the newest seq passed on per
symbol, and knows nothing of connections.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping

from app import metrics
from app.broker import price_channel
from app.history.service import History
from app.prices.store import TickStore
from app.prices.ticks import MalformedTick, Tick, decode_tick

logger = logging.getLogger(__name__)

_REPAIR_TIMEOUT_SECONDS = 2.0
_BACKLOG_TICKS = 10_000  # ticks held while a gap is refetched; the oldest go first (refetched)


class Sequencer:
    """`deliver(ticks)`: called with each run of new ticks, in order (each seq above the last
    passed on for its symbol); what it raises ends the run (see `start`)."""

    def __init__(
        self,
        *,
        store: TickStore,
        retention: int,
        deliver: Callable[[list[Tick]], None],
        max_lag_ms: int = 50,
        history: History | None = None,
        reset: Callable[[Tick], None] | None = None,
        newest: Mapping[str, Tick] | None = None,
    ) -> None:
        """`history`: where gaps are refetched (the window, and the database beyond it).
        `reset(tick)`: the feed of `tick`'s symbol starts afresh there (a gap stored nowhere,
        a seq that went back); without it, such a gap is a plain jump. `newest`: the newest
        tick passed on per symbol (the hub's), which tells a seq that went back from a
        redelivery."""
        self._store = store
        self._retention = retention
        self.deliver = deliver
        self._history = history or History(store=store, sessions=None, retention=retention)
        self._reset = reset
        self._newest: Mapping[str, Tick] = newest if newest is not None else {}
        self._max_lag_ms = max_lag_ms
        self._last_seq: dict[str, int] = {}
        # Before a symbol's first tick: the highest plausible seq (the store's latest at
        # `start`, plus the retention); see `_prime`.
        self._ceiling: dict[str, int] = {}
        self._prime_tasks: set[asyncio.Task[None]] = set()
        # broker channel -> symbol, of what `start` and `take` took and `drop` did not end
        self._channels: dict[str, str] = {}
        # While a gap is refetched: the ticks that came after it, in order (None otherwise).
        self._backlog: deque[Tick] | None = None
        self._repair_task: asyncio.Task[None] | None = None
        self._failed: asyncio.Future[None] | None = None

    @property
    def last_seq(self) -> Mapping[str, int]:
        """The newest seq passed on (or skipped on purpose), per symbol."""
        return self._last_seq

    @property
    def channels(self) -> list[str]:
        """The broker channels of the symbols taken (`start`, `take`), in that order."""
        return list(self._channels)

    def start(self, symbols: list[str]) -> asyncio.Future[None]:
        """Take bursts of `symbols`' channels from now on, until `stop`. The future fails with
        whatever goes wrong in here (a failing `deliver`, a bug), and nothing more is taken;
        a fresh `start` goes on from the seqs already passed on."""
        self._channels = {price_channel(s): s for s in symbols}
        self._backlog = None
        self._failed = asyncio.get_running_loop().create_future()
        self._prime_unseen(symbols)
        return self._failed

    def take(self, symbols: list[str]) -> None:
        """Take `symbols`' channels too, while running (an instrument added): called before
        the broker delivers them. The symbols taken already go on untouched."""
        new = [s for s in symbols if price_channel(s) not in self._channels]
        for symbol in new:
            self._channels[price_channel(symbol)] = symbol
        if self._failed is not None:
            self._prime_unseen(new)

    def drop(self, symbols: list[str]) -> None:
        """Pass nothing more of `symbols` on, from this call (an instrument disabled): their
        messages are ignored and their ticks held behind a refetch let go. Their last seqs
        are kept: taken again, a symbol goes on from there (the lanes read them too)."""
        gone = {s for s in symbols if self._channels.pop(price_channel(s), None) is not None}
        backlog = self._backlog
        if gone and backlog:
            kept = [t for t in backlog if t.symbol not in gone]
            backlog.clear()
            backlog.extend(kept)

    def _prime_unseen(self, symbols: list[str]) -> None:
        unseen = [s for s in symbols if s not in self._last_seq]
        if unseen:
            task = asyncio.get_running_loop().create_task(self._prime(unseen), name="hub-prime")
            self._prime_tasks.add(task)
            task.add_done_callback(self._prime_tasks.discard)

    def stop(self) -> None:
        self._failed = None
        for task in list(self._prime_tasks):
            task.cancel()
        if self._repair_task is not None:
            self._repair_task.cancel()
            self._repair_task = None

    def on_burst(self, messages: list[tuple[str, str]]) -> None:
        """Every message (channel, text) of one read from the broker."""
        failed = self._failed
        if failed is None or failed.done():
            return
        try:
            ticks = self._decode(messages, self._channels)
            if self._backlog is not None:  # a refetch is running: these go after it
                self._hold(ticks)
            elif ticks and (rest := self._pass_on(ticks)):
                self._backlog = deque(maxlen=_BACKLOG_TICKS)
                self._hold(rest)
                self._repair_task = asyncio.get_running_loop().create_task(
                    self._refetch_then_resume(), name="hub-repair"
                )
        except Exception as exc:  # noqa: BLE001 - handed to `start`'s future, which raises it
            failed.set_exception(exc)

    @staticmethod
    def _decode(messages: list[tuple[str, str]], channels: dict[str, str]) -> list[Tick]:
        ticks = []
        for channel, text in messages:
            expected = channels.get(channel)
            if expected is None:
                continue  # a channel dropped while its message was on its way
            try:
                tick = decode_tick(text)
            except MalformedTick as exc:
                metrics.BROKER_DROPPED.labels(reason="malformed").inc()
                logger.warning("hub: dropped a malformed message on %s: %s", channel, exc)
                continue
            if tick.symbol != expected:
                metrics.BROKER_DROPPED.labels(reason="wrong_channel").inc()
                continue
            ticks.append(tick)
        return ticks

    def _pass_on(self, ticks: list[Tick]) -> list[Tick]:
        """Deliver a burst, in order, up to its first broker gap; return the ticks from that
        gap on (empty: no gap), which must wait for the gap's refetch."""
        if len(ticks) > 1:
            ticks = self._skip_stale(ticks)
            if not ticks:
                return ticks
        metrics.FANOUT_LAG.observe(max(time.time() - ticks[0].ts / 1000, 0.0))
        run: list[Tick] = []
        last_seq = self._last_seq
        try:
            for i, tick in enumerate(ticks):  # `_take`, inline: this loop runs for every tick
                symbol = tick.symbol
                last = last_seq.get(symbol)
                if last is not None:
                    if tick.seq > last + 1:
                        return ticks[i:]  # what came before the gap goes now (finally)
                    if tick.seq <= last:
                        if self._went_back(tick, last):
                            return ticks[i:]  # checked with the store, then a reset
                        continue  # passed on already: a redelivery
                elif tick.seq > self._ceiling.get(symbol, tick.seq):
                    return ticks[i:]  # a first tick far past the store: checked there
                last_seq[symbol] = tick.seq
                run.append(tick)
            return []
        finally:
            if run:
                self._hand_on(run)

    def _went_back(self, tick: Tick, last: int) -> bool:
        """Whether `tick`, at or below the last seq passed on, may be the start of a seq that
        went back (its producer restarted below it) rather than a redelivery: it is newer than
        the newest tick passed on. The store says which (`_confirm_went_back`)."""
        if self._reset is None or tick.seq == last:
            return False
        newest = self._newest.get(tick.symbol)
        return newest is not None and tick.ts > newest.ts

    def rewind(self, ticks: list[Tick]) -> None:
        """`deliver` failed before these ticks of its run (in order): they were not passed on
        after all. Each symbol's last seq goes back to just before its first one, so the next
        tick after a restart shows the gap and it is refetched, as any broker gap is."""
        last_seq, seen = self._last_seq, set()
        for tick in ticks:
            if tick.symbol not in seen:
                seen.add(tick.symbol)
                last_seq[tick.symbol] = tick.seq - 1

    def _take(self, tick: Tick, run: list[Tick]) -> None:
        """Add `tick` to `run` unless it was passed on already (a redelivery, or a refetch that
        raced the live tick), or its symbol was dropped meanwhile."""
        symbol = tick.symbol
        if price_channel(symbol) not in self._channels:
            return  # dropped while it was refetched
        last = self._last_seq.get(symbol)
        if last is None or tick.seq > last:
            self._last_seq[symbol] = tick.seq
            run.append(tick)

    def _hand_on(self, run: list[Tick]) -> None:
        metrics.TICKS_RECEIVED.inc(len(run))
        self.deliver(run)

    def _skip_stale(self, ticks: list[Tick]) -> list[Tick]:
        """When the hub is behind, a burst holds several ticks of a symbol: pass on only those
        within `max_lag_ms` of its newest. Clients see a `seq` jump, and latency stays bounded
        instead of growing with the backlog. Only a plausible seq sets the newest: a forged
        tick's ts far ahead must not make the real ticks beside it stale; it is kept, to be
        checked with the store."""
        newest: dict[str, int] = {}
        last_seq = self._last_seq
        for tick in ticks:
            if tick.ts > newest.get(tick.symbol, -1) and not self._implausible(
                tick, last_seq.get(tick.symbol)
            ):
                newest[tick.symbol] = tick.ts
        kept: list[Tick] = []
        for tick in ticks:
            if newest.get(tick.symbol, tick.ts) - tick.ts <= self._max_lag_ms:
                kept.append(tick)
            elif 0 < tick.seq - self._last_seq.get(tick.symbol, -1) <= self._retention:
                # Skipped on purpose: not a gap to repair. Not so a seq implausibly far ahead
                # (it is checked with the store if it ever comes back as the newest).
                self._last_seq[tick.symbol] = tick.seq
        if len(kept) < len(ticks):
            metrics.HUB_SKIPPED.inc(len(ticks) - len(kept))
        return kept

    def _hold(self, ticks: list[Tick]) -> None:
        backlog = self._backlog
        assert backlog is not None
        overflow = len(backlog) + len(ticks) - _BACKLOG_TICKS
        if overflow > 0:  # the oldest leave; the seq jump they leave behind is refetched too
            metrics.HUB_BACKLOG_DROPPED.inc(overflow)
        backlog.extend(ticks)

    async def _refetch_then_resume(self) -> None:
        """Refetch the gap at the head of the backlog from the store (a failed refetch leaves
        a visible `seq` jump), then pass what waited behind it on as one burst (stale ticks
        skipped, as when the hub is behind) up to its next gap; until the backlog is empty.
        Then bursts are passed on as they come again."""
        backlog = self._backlog
        assert backlog is not None
        try:
            while backlog:
                run: list[Tick] = []
                tick = backlog.popleft()
                try:
                    last = self._last_seq.get(tick.symbol)
                    if self._implausible(tick, last) and not await self._stored(tick):
                        continue  # forged or corrupt: passing it on would freeze the symbol
                    if last is not None and tick.seq <= last:
                        if self._went_back(tick, last) and await self._confirm_went_back(
                            tick, last
                        ):
                            self._restart(tick, run)
                        continue  # or a redelivery after all
                    if last is not None and tick.seq > last + 1:
                        if await self._repair_gap(tick.symbol, last, tick.seq, run):
                            self._restart(tick, run)
                            continue
                    self._take(tick, run)  # refetched or not: no retry loop
                finally:
                    if run:
                        self._hand_on(run)
                if backlog:
                    waiting = list(backlog)
                    backlog.clear()
                    backlog.extend(self._pass_on(waiting))
        except Exception as exc:  # noqa: BLE001 - handed to `start`'s future, which raises it
            if self._failed is not None and not self._failed.done():
                self._failed.set_exception(exc)
        finally:
            if self._backlog is backlog:
                self._backlog = None
                self._repair_task = None

    async def _prime(self, symbols: list[str]) -> None:
        """Learn how far the first tick of each symbol may plausibly be: the store's latest
        seq plus the retention (the retention alone for a symbol the store has not seen).
        Until this answers, and if it fails, first ticks are taken as they come."""
        try:
            async with asyncio.timeout(_REPAIR_TIMEOUT_SECONDS):
                latest = await self._store.read_latest(symbols)
        except Exception as exc:  # noqa: BLE001 - then first ticks go unchecked, as before
            logger.warning("hub: could not read the latest seqs: %s", exc)
            return
        for symbol in symbols:
            stored = latest.get(symbol)
            self._ceiling[symbol] = (stored.seq if stored else 0) + self._retention

    def _implausible(self, tick: Tick, last: int | None) -> bool:
        """Whether `tick`'s seq is more than the retention past the last passed on (before a
        symbol's first tick: past its ceiling), so it must be checked with the store."""
        if last is not None:
            return tick.seq > last + self._retention
        return tick.seq > self._ceiling.get(tick.symbol, tick.seq)

    async def _stored(self, tick: Tick) -> bool:
        """Whether the store holds `tick`'s seq (its symbol's latest is at or past it): asked
        of a tick more than the retention ahead of what was passed on. One the store does not
        have was never written by the producer (a forged or corrupt message): taken, it would
        raise `last_seq` so far that every real tick after it looks like a redelivery. It is
        dropped and counted. A store that cannot answer keeps the tick (a seq jump, as when a
        refetch fails): an outage must not stop the feed."""
        try:
            async with asyncio.timeout(_REPAIR_TIMEOUT_SECONDS):
                latest = await self._store.read_latest([tick.symbol])
        except Exception as exc:  # noqa: BLE001 - the store is down: trust the broker
            logger.warning("hub: could not check %s seq %d: %s", tick.symbol, tick.seq, exc)
            return True
        stored = latest.get(tick.symbol)
        if stored is not None and stored.seq >= tick.seq:
            return True
        metrics.BROKER_DROPPED.labels(reason="implausible_seq").inc()
        logger.warning(
            "hub: dropped %s seq %d, %d past the last passed on and not in the store",
            tick.symbol,
            tick.seq,
            tick.seq - self._last_seq.get(tick.symbol, 0),
        )
        return False

    async def _repair_gap(self, symbol: str, last: int, upto: int, run: list[Tick]) -> bool:
        """The broker skipped seqs after `last`, up to `upto`: refetch them onto `run` from the
        window (where the producer wrote them first) and the database beyond it. True when
        the tick at `upto` must be a reset: the whole gap was asked for and some of it is
        stored nowhere. A refetch that fails, or a gap longer than the retention (only its
        start is refetched), leaves a plain `seq` jump: those ticks may be in `/history`."""
        wanted = min(upto - last - 1, self._retention)
        try:
            async with asyncio.timeout(_REPAIR_TIMEOUT_SECONDS):
                missing = await self._history.ticks_after(symbol, since=last, limit=wanted)
        except Exception as exc:  # noqa: BLE001 - a failed repair leaves a visible seq jump
            logger.warning(
                "hub: could not refetch %s seq %d..%d: %s", symbol, last + 1, upto - 1, exc
            )
            return False
        for tick in missing:
            if tick.seq >= upto:
                break
            metrics.GAPS_REPAIRED.inc()
            before = self._last_seq.get(symbol)
            if before is not None and tick.seq > before + 1 and wanted == upto - last - 1:
                self._restart(tick, run)  # a hole inside the gap, stored nowhere
            else:
                self._take(tick, run)
        reached = self._last_seq.get(symbol, last)
        return self._reset is not None and wanted == upto - last - 1 and reached < upto - 1

    async def _confirm_went_back(self, tick: Tick, last: int) -> bool:
        """Whether the store agrees that `tick`'s seq went back: its latest is in the new,
        lower run (at or past `tick`, below `last`). A store that cannot answer keeps the
        feed as it was (the tick is dropped as a redelivery): a forged low seq must not
        rewind a symbol."""
        try:
            async with asyncio.timeout(_REPAIR_TIMEOUT_SECONDS):
                latest = await self._store.read_latest([tick.symbol])
        except Exception as exc:  # noqa: BLE001 - then it is taken for a redelivery
            logger.warning("hub: could not check %s seq %d: %s", tick.symbol, tick.seq, exc)
            return False
        stored = latest.get(tick.symbol)
        return stored is not None and tick.seq <= stored.seq < last

    def _restart(self, tick: Tick, run: list[Tick]) -> None:
        """`tick`'s symbol starts afresh at `tick`: what `run` holds goes on first, then the
        reset. Without a `reset` callback, `tick` is passed on as any tick (a plain jump)."""
        if price_channel(tick.symbol) not in self._channels:
            return  # dropped while it was refetched
        if self._reset is None:
            self._last_seq[tick.symbol] = tick.seq
            run.append(tick)
            return
        if run:
            before, run[:] = run[:], []  # emptied first: a failing deliver hands nothing twice
            self._hand_on(before)
        logger.warning("hub: %s starts afresh at seq %d (a reset)", tick.symbol, tick.seq)
        self._reset(tick)  # before the last seq moves: lanes leave at the old one
        self._last_seq[tick.symbol] = tick.seq
