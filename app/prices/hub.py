"""The fan-out hub: one broker subscription per symbol per process, shared by every local
stream, and the per-stream outbox that keeps a slow reader from growing memory.

Where a tick goes: broker → `FanoutHub._on_burst`, called by the broker with every message of
one read from Redis, in that read (no queue, no task switch: `Broker.subscribe_bursts`), then
one of three ways, fastest first:
- a *lane*: connections subscribed to one symbol that are up to date, keeping up and have
  nothing queued. At the end of the burst the hub sends the symbol's frames (encoded once) to
  every lane member from one C loop over descriptors the lane holds (`_fanout.c`; members it
  cannot send to that way are written through their transports in a plain Python loop): no
  per-connection Python call, no state update.
  A member leaves its lane the moment that stops being true (its transport pauses writing, a
  protocol frame queues, it subscribes to more, its token is due, it closes).
- `Outbox.offer` of every other stream subscribed to that symbol, then one direct write per
  connection at the end of the burst (`Outbox.flush`) of the same pre-encoded frames;
- or, for a connection that is behind or has protocol frames queued, its writer task
  (app/prices/streams.py).

Ordering and exactly-once per stream come from `seq`: the hub drops a tick it has already
passed on, and refetches from the store what a broker gap skipped; each outbox keeps a
per-symbol floor and never enqueues a seq at or below it. While a refetch awaits the store,
later bursts wait in a bounded backlog behind it (what overflows it is refetched in turn).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import resource
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from app import metrics
from app.broker import Broker, price_channel
from app.frames import FrameWriter, Transport
from app.prices.store import TickStore
from app.prices.ticks import MalformedTick, Tick, as_snapshot, decode_tick
from app.prices.wire import text_frame

send_all: Callable[[array[int], bytes, array[int]], None] | None
try:  # the lanes' send loop in C; optional (a build without a compiler writes in Python)
    from app.prices._fanout import send_all
except ImportError:  # pragma: no cover - depends on the build
    send_all = None

logger = logging.getLogger(__name__)

DIRECT_WRITES_AVAILABLE = send_all is not None
_SWEEP_SECONDS = 1.0  # how often a lane looks for members whose transport closed under it
_FD_RESERVE = 1024  # descriptors kept for what is not a stream (see FanoutHub.direct_limit)

_REPAIR_TIMEOUT_SECONDS = 2.0
_BACKLOG_TICKS = 10_000  # ticks held while a gap is refetched; the oldest go first (refetched)


@dataclass(slots=True)
class Frame:
    symbol: str
    seq: int
    text: str
    event: str  # "tick", "snapshot", "replay" (a retained tick sent for `since`), "control"

    @property
    def pinned(self) -> bool:
        """Never conflated away."""
        return self.event == "replay" or self.event == "control"


class Outbox:
    """What one stream has yet to send. Live ticks go straight to the connection when it has a
    `direct` frame writer and nothing is queued before them; otherwise they queue here for the
    stream's writer. Bounded: past `limit` frames it conflates, keeping only the newest frame of
    each symbol (the client sees a `seq` jump)."""

    __slots__ = (
        "_frames",
        "_limit",
        "_floor",
        "_syncing",
        "_awaiting_snapshot",
        "_on_queued",
        "_flushing",
        "_pinned",
        "closed",
        "_corked",
        "_corked_texts",
        "direct",
        "_batch",
        "_deadline",
        "_sent",
        "conflated",
        "lane",
        "_lane_mark",
    )

    def __init__(
        self,
        *,
        limit: int,
        on_queued: Callable[[], None],
        direct: FrameWriter | None = None,
        deadline: float = math.inf,
    ) -> None:
        self._frames: list[Frame] = []
        self._limit = limit
        self._floor: dict[str, int] = {}  # symbol → highest seq enqueued (subscribed symbols)
        self._syncing: dict[str, list[Tick]] = {}  # live ticks held while a snapshot loads
        self._awaiting_snapshot: set[str] = set()  # subscribed before the symbol's first tick
        self._on_queued = on_queued  # wakes whoever writes queued frames
        self._flushing = False  # the writer holds drained frames not yet written
        self._pinned = 0  # queued frames conflation keeps (they do not count against `limit`)
        self.closed = False  # its stream is gone: the hub must not attach it again
        # Direct writes held until the burst ends: encoded frames, or texts in batch mode.
        self._corked: list[bytes] = []
        self._corked_texts: list[str] = []
        self.direct = direct
        self._batch = False  # the client accepts JSON-array frames
        self._deadline = deadline  # Unix time after which nothing more may be sent
        self._sent = 0  # frames written directly, outside a lane
        self.conflated = 0
        self.lane: _Lane | None = None  # the hub's fast path, while it qualifies
        self._lane_mark = 0  # the lane's `delivered` when this outbox joined it

    @property
    def symbols(self) -> set[str]:
        return set(self._floor) | set(self._syncing)

    @property
    def batch(self) -> bool:
        return self._batch

    @batch.setter
    def batch(self, value: bool) -> None:
        if value != self._batch:
            self.leave_lane()  # its lane writes the other frame shape
            self._batch = value

    @property
    def deadline(self) -> float:
        return self._deadline

    @deadline.setter
    def deadline(self, value: float) -> None:
        self.leave_lane()  # the lane checks its members' deadlines; it rejoins on its next tick
        self._deadline = value

    @property
    def sent(self) -> int:
        """Live tick frames written to the connection without queueing."""
        lane = self.lane
        return self._sent + (lane.delivered - self._lane_mark if lane is not None else 0)

    def leave_lane(self) -> None:
        """Back to the per-tick path (`offer`), from the seq its lane got to."""
        lane = self.lane
        if lane is not None:
            lane.hub.leave_lane(self)

    def lane_symbol(self) -> str | None:
        """The symbol of the lane this outbox qualifies for, as far as it alone can tell: one
        symbol, subscribed and synced, written directly, nothing queued, not closed."""
        if (
            self.direct is None
            or self.closed
            or self._frames
            or self._flushing
            or self._syncing
            or self._awaiting_snapshot
            or self._corked
            or self._corked_texts
            or len(self._floor) != 1
        ):
            return None
        return next(iter(self._floor))

    def __len__(self) -> int:
        return len(self._frames)

    def offer(self, tick: Tick, wire: bytes) -> bool:
        """Take a live tick (`wire`: its encoded frame). True if it was corked for a direct
        write and this outbox had nothing corked before: the caller must `flush()` it."""
        symbol = tick.symbol
        floor = self._floor.get(symbol)
        if floor is None:  # not subscribed, or its snapshot is still loading
            held = self._syncing.get(symbol)
            if held is not None:
                held.append(tick)
                if len(held) > self._limit:
                    del held[0]
            return False
        if tick.seq <= floor:
            return False
        if self._awaiting_snapshot and symbol in self._awaiting_snapshot:
            self._awaiting_snapshot.discard(symbol)
            self._push(Frame(symbol, tick.seq, tick.snapshot_frame, "snapshot"))
            return False
        direct = self.direct
        if direct is not None and not self._frames and not self._flushing and direct.keeping_up():
            self._floor[symbol] = tick.seq
            if self._batch:
                self._corked_texts.append(tick.frame)
                return len(self._corked_texts) == 1
            self._corked.append(wire)
            return len(self._corked) == 1
        self._push(Frame(symbol, tick.seq, tick.frame, "tick"))
        return False

    def flush(self, now: float) -> int:
        """Write what `offer` corked, in one write; how many frames that carried."""
        direct = self.direct
        if self._corked_texts:  # batch mode: one frame, an array when there are several
            texts, self._corked_texts = self._corked_texts, []
            count = len(texts)
            data = text_frame((texts[0] if count == 1 else "[" + ",".join(texts) + "]").encode())
        else:
            frames, self._corked = self._corked, []
            count = len(frames)
            data = frames[0] if count == 1 else b"".join(frames)
        if direct is None or now >= self._deadline or not count or not direct.write(data):
            return 0  # closed or expired meanwhile: the stream's close follows
        self._sent += count
        return count

    def _push(self, frame: Frame) -> None:
        self.leave_lane()  # queued frames go out through the writer; ticks queue behind them
        self._floor[frame.symbol] = frame.seq
        if len(self._frames) >= self._limit + self._pinned:
            self._conflate()
        self._frames.append(frame)
        self._on_queued()

    def _pin(self, frame: Frame) -> None:
        """Queue a frame conflation must keep: a protocol reply, or a replayed tick (a `since`
        resume owes the client every retained tick; the replay is finite)."""
        self.leave_lane()
        if frame.symbol:
            self._floor[frame.symbol] = frame.seq
        self._frames.append(frame)
        self._pinned += 1
        self._on_queued()

    def _conflate(self) -> None:
        seen: set[str] = set()
        snapshot_dropped: set[str] = set()
        kept: list[Frame] = []
        for frame in reversed(self._frames):
            if frame.pinned or frame.symbol not in seen:
                seen.add(frame.symbol)
                kept.append(frame)
            elif frame.event == "snapshot":
                snapshot_dropped.add(frame.symbol)
        for i, frame in enumerate(kept):
            if frame.symbol in snapshot_dropped and frame.event == "tick":
                # The client must still see a snapshot first: the survivor becomes it.
                kept[i] = Frame(frame.symbol, frame.seq, as_snapshot(frame.text), "snapshot")
        kept.reverse()
        dropped = len(self._frames) - len(kept)
        self._frames = kept
        self.conflated += dropped
        metrics.CONFLATED.inc(dropped)

    def begin_sync(self, symbol: str) -> None:
        self._syncing[symbol] = []
        self._floor.pop(symbol, None)

    def end_sync(
        self, symbol: str, initial: list[Frame], *, floor: int, first_live_is_snapshot: bool
    ) -> None:
        """Enqueue the snapshot/history frames, then the live ticks held meanwhile."""
        held = self._syncing.pop(symbol, None)
        if held is None:  # unsubscribed while loading
            return
        self._floor[symbol] = floor
        for frame in initial:
            if frame.event == "replay":
                self._pin(frame)
            else:
                self._push(frame)
        for tick in held:
            if tick.seq <= self._floor[symbol]:
                continue
            if first_live_is_snapshot:
                # No tick existed yet when the stream opened: the first one is its snapshot.
                self._push(Frame(tick.symbol, tick.seq, tick.snapshot_frame, "snapshot"))
                first_live_is_snapshot = False
            else:
                self._push(Frame(tick.symbol, tick.seq, tick.frame, "tick"))
        if first_live_is_snapshot:
            self._awaiting_snapshot.add(symbol)

    def remove(self, symbol: str) -> None:
        self._floor.pop(symbol, None)
        self._syncing.pop(symbol, None)
        self._awaiting_snapshot.discard(symbol)
        self._frames = [f for f in self._frames if f.symbol != symbol]
        self._pinned = sum(1 for f in self._frames if f.pinned)

    def push_control(self, text: str) -> None:
        """A protocol frame (subscribed, pong, error…): never conflated away."""
        self._pin(Frame("", 0, text, "control"))

    def drain(self) -> list[Frame]:
        """Take the queued frames; until `flushed()`, new ticks queue behind them."""
        if self._corked or self._corked_texts:
            self.flush(time.time())  # what was corked came first
        frames, self._frames = self._frames, []
        self._pinned = 0
        self._flushing = bool(frames)
        return frames

    def flushed(self) -> None:
        self._flushing = False


class _Lane:
    """The outboxes of one symbol (and one frame shape) that the hub writes to in a plain loop.

    Members are up to date: each has been sent every tick of the symbol up to the hub's last
    passed-on seq, so they need no per-tick bookkeeping. `delivered` counts the ticks written
    to the lane, so a member's own count is what it grew by while the member was in it."""

    __slots__ = (
        "hub",
        "symbol",
        "batch",
        "members",
        "_fds",
        "_transports",
        "_direct",
        "_failed",
        "deadline",
        "sweep_at",
        "delivered",
    )

    def __init__(self, hub: FanoutHub, symbol: str, batch: bool) -> None:
        self.hub = hub
        self.symbol = symbol
        self.batch = batch
        self.members: dict[Outbox, Transport] = {}
        # Members the hub send()s to itself, each by a descriptor of its own (closed when it
        # leaves); the others are written through their transports.
        self._fds: dict[Outbox, int] = {}
        self._transports: tuple[Transport, ...] | None = ()
        self._direct: tuple[array[int], tuple[Outbox, ...]] | None = (array("i"), ())
        self._failed = array("q", [0])  # send_all's report: count, then (index, sent, errno)s
        self.deadline = math.inf  # no member's token is due before this
        self.sweep_at = 0.0
        self.delivered = 0

    def transports(self) -> tuple[Transport, ...]:
        """The transports of the members written through them."""
        transports = self._transports
        if transports is None:
            fds = self._fds
            transports = self._transports = tuple(
                t for o, t in self.members.items() if o not in fds
            )
        return transports

    def direct(self) -> tuple[array[int], tuple[Outbox, ...], array[int]]:
        """The descriptors of the members sent to directly, those members in the same order,
        and room for `send_all` to report on every one of them."""
        direct = self._direct
        if direct is None:
            direct = self._direct = (array("i", self._fds.values()), tuple(self._fds))
            if len(self._failed) < 1 + 3 * len(self._fds):
                self._failed = array("q", bytes(8 * (1 + 3 * len(self._fds))))
        return direct[0], direct[1], self._failed

    def is_direct(self, outbox: Outbox) -> bool:
        """Whether the hub send()s to this member itself."""
        return outbox in self._fds

    def add(self, outbox: Outbox, transport: Transport, fd: int | None) -> None:
        self.members[outbox] = transport
        if fd is not None:
            self.send_directly(outbox, fd)
        self._transports = None
        outbox.lane = self
        outbox._lane_mark = self.delivered
        metrics.LANE_MEMBERS.inc()
        if outbox.deadline < self.deadline:
            self.deadline = outbox.deadline

    def send_directly(self, outbox: Outbox, fd: int) -> None:
        """From now on `outbox` is sent to through `fd`, which the lane closes when it leaves."""
        self._fds[outbox] = fd
        self._direct = None
        self._transports = None
        self.hub.direct_held += 1

    def remove(self, outbox: Outbox) -> None:
        del self.members[outbox]
        fd = self._fds.pop(outbox, None)
        if fd is not None:
            self._direct = None
            self.hub.direct_held -= 1
            os.close(fd)
        self._transports = None
        outbox.lane = None
        outbox._sent += self.delivered - outbox._lane_mark
        metrics.LANE_MEMBERS.dec()


def direct_limit(max_connections: int) -> int:
    """How many lane members may hold a descriptor of their own: what the process's open-file
    limit leaves beyond `max_connections` streams and a reserve for everything else."""
    soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(0, soft_limit - max_connections - _FD_RESERVE)


class FanoutHub:
    def __init__(
        self,
        *,
        broker: Broker,
        store: TickStore,
        retention: int,
        max_lag_ms: int = 50,
        direct_writes: bool = True,
        max_connections: int = 10_000,
    ) -> None:
        self._broker = broker
        # Lane members sent to by the C loop (app/prices/_fanout.c), when it was built.
        self._direct_writes = direct_writes and DIRECT_WRITES_AVAILABLE
        # Each lane member sent to directly holds a second descriptor. Those come only out of
        # what the open-file limit leaves beyond every connection this process may accept and
        # a reserve (requests, the database, Redis, logs): a direct send never costs a client
        # its connection. Short of that, members are written through their transports.
        self.direct_limit = direct_limit(max_connections)
        self.direct_held = 0
        if direct_writes and not DIRECT_WRITES_AVAILABLE:
            logger.warning(
                "hub: app/prices/_fanout.c was not built: lanes are written in Python "
                "(reinstall with a C compiler for the faster path)"
            )
        elif self._direct_writes and not self.direct_limit:
            logger.warning(
                "hub: the open-file limit (%d) leaves no descriptors beyond %d connections: "
                "lanes are written in Python (raise `ulimit -n`)",
                resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                max_connections,
            )
        self._store = store
        self._retention = retention
        self._max_lag_ms = max_lag_ms
        self._streams: dict[str, set[Outbox]] = {}  # per symbol, every subscriber not in a lane
        self._lanes: dict[str, tuple[_Lane, _Lane]] = {}  # per symbol: plain and batch frames
        self._last_seq: dict[str, int] = {}
        self._latest: dict[str, Tick] = {}  # the newest tick passed on, per symbol
        self._channels: dict[str, str] = {}  # broker channel -> symbol, of what `consume` takes
        # While a gap is refetched: the ticks that came after it, in order (None otherwise).
        self._backlog: deque[Tick] | None = None
        self._repair_task: asyncio.Task[None] | None = None
        self._failed: asyncio.Future[None] | None = None

    @property
    def subscription_count(self) -> int:
        return sum(len(s) for s in self._streams.values()) + self.lane_count

    @property
    def lane_count(self) -> int:
        """Subscriptions on the fast path."""
        return sum(len(lane.members) for lanes in self._lanes.values() for lane in lanes)

    async def consume(self, symbols: list[str]) -> None:
        """Pass every tick of `symbols` from the broker to the local streams, until cancelled.

        The broker calls `_on_burst` with each read's messages; what goes wrong in there ends
        this coroutine with its exception, so its supervisor logs it and subscribes afresh."""
        self._channels = {price_channel(s): s for s in symbols}
        self._backlog = None
        failed = self._failed = asyncio.get_running_loop().create_future()
        try:
            async with self._broker.subscribe_bursts(list(self._channels), self._on_burst):
                await failed
        finally:
            self._failed = None
            if self._repair_task is not None:
                self._repair_task.cancel()
                self._repair_task = None

    def _on_burst(self, messages: list[tuple[str, str]]) -> None:
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
        except Exception as exc:  # noqa: BLE001 - handed to `consume`, which raises it
            failed.set_exception(exc)

    def _pass_on(self, ticks: list[Tick]) -> list[Tick]:
        """Deliver a burst, in order, up to its first broker gap; return the ticks from that
        gap on (empty: no gap), which must wait for the gap's refetch."""
        if len(ticks) > 1:
            ticks = self._skip_stale(ticks)
            if not ticks:
                return ticks
        metrics.FANOUT_LAG.observe(max(time.time() - ticks[0].ts / 1000, 0.0))
        dirty: list[Outbox] = []
        lanes: dict[str, list[tuple[Tick, bytes]]] = {}
        last_seq = self._last_seq
        try:
            for i, tick in enumerate(ticks):
                last = last_seq.get(tick.symbol)
                if last is not None and tick.seq > last + 1:
                    return ticks[i:]  # what came before the gap goes now (finally)
                self._deliver(tick, dirty, lanes)
            return []
        finally:
            self._flush(dirty, lanes)

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
                dirty: list[Outbox] = []
                lanes: dict[str, list[tuple[Tick, bytes]]] = {}
                tick = backlog.popleft()
                try:
                    last = self._last_seq.get(tick.symbol)
                    if last is not None and tick.seq > last + 1:
                        await self._repair_gap(tick.symbol, last, tick.seq, dirty, lanes)
                    self._deliver(tick, dirty, lanes)  # refetched or not: no retry loop
                finally:
                    self._flush(dirty, lanes)
                if backlog:
                    waiting = list(backlog)
                    backlog.clear()
                    backlog.extend(self._pass_on(waiting))
        except Exception as exc:  # noqa: BLE001 - handed to `consume`, which raises it
            if self._failed is not None and not self._failed.done():
                self._failed.set_exception(exc)
        finally:
            if self._backlog is backlog:
                self._backlog = None
                self._repair_task = None

    @staticmethod
    def _decode(messages: list[tuple[str, str]], channels: dict[str, str]) -> list[Tick]:
        ticks = []
        for channel, text in messages:
            try:
                tick = decode_tick(text)
            except MalformedTick as exc:
                metrics.BROKER_DROPPED.labels(reason="malformed").inc()
                logger.warning("hub: dropped a malformed message on %s: %s", channel, exc)
                continue
            if tick.symbol != channels.get(channel):
                metrics.BROKER_DROPPED.labels(reason="wrong_channel").inc()
                continue
            ticks.append(tick)
        return ticks

    def _skip_stale(self, ticks: list[Tick]) -> list[Tick]:
        """When the hub is behind, a burst holds several ticks of a symbol: pass on only those
        within `max_lag_ms` of its newest. Clients see a `seq` jump, and latency stays bounded
        instead of growing with the backlog."""
        newest: dict[str, int] = {}
        for tick in ticks:
            if tick.ts > newest.get(tick.symbol, -1):
                newest[tick.symbol] = tick.ts
        kept: list[Tick] = []
        for tick in ticks:
            if newest[tick.symbol] - tick.ts <= self._max_lag_ms:
                kept.append(tick)
            elif tick.seq > self._last_seq.get(tick.symbol, -1):
                self._last_seq[tick.symbol] = tick.seq  # skipped on purpose: not a gap to repair
        if len(kept) < len(ticks):
            metrics.HUB_SKIPPED.inc(len(ticks) - len(kept))
        return kept

    def _flush(self, dirty: list[Outbox], lanes: dict[str, list[tuple[Tick, bytes]]]) -> None:
        """Write what the burst gave each connection: lanes first, then the corked outboxes,
        which join their lane if they now qualify."""
        if not lanes and not dirty:
            return
        now = time.time()
        sent = 0
        for symbol, pending in lanes.items():
            plain, batch = self._lanes[symbol]
            count = len(pending)
            if plain.members:
                data = pending[0][1] if count == 1 else b"".join(wire for _, wire in pending)
                sent += self._write_lane(plain, data, count, now)
            if batch.members:
                if count == 1:
                    data = pending[0][1]
                else:
                    text = "[" + ",".join(tick.frame for tick, _ in pending) + "]"
                    data = text_frame(text.encode())
                sent += self._write_lane(batch, data, count, now)
        error: Exception | None = None
        for outbox in dirty:
            try:
                written = outbox.flush(now)
                if written:
                    sent += written
                    self._join_lane(outbox, now)
            except Exception as exc:  # noqa: BLE001 - raised below, once every cork is written
                error = error or exc
        if sent:
            metrics.MESSAGES_SENT.inc(sent)
        if error is not None:
            raise error

    def _write_lane(self, lane: _Lane, data: bytes, count: int, now: float) -> int:
        """`data` (frames for `count` ticks) to every member; how many ticks that sent."""
        if now >= lane.deadline:
            self._expire_lane(lane, now)
        if now >= lane.sweep_at:
            self._sweep_lane(lane, now)
        lane.delivered += count
        written = 0
        fds, direct, failed = lane.direct()
        if direct:
            assert send_all is not None
            send_all(fds, data, failed)  # allocates nothing: it cannot fail halfway
            written = len(direct)
            for i in range(1, 1 + 3 * failed[0], 3):
                # A full socket (or a dead peer): the transport takes the rest, in order, and
                # the member leaves; it rejoins, sent to directly again, once its transport
                # has drained. A dead peer's transport meets the same error and closes.
                outbox, sent = direct[failed[i]], failed[i + 1]
                transport = lane.members[outbox]
                self.leave_lane(outbox)
                if transport.is_closing():
                    written -= 1
                else:
                    transport.write(data[sent:])
        for transport in lane.transports():
            # A transport closing under us: uvicorn wrote its close frame (a peer's close,
            # shutdown, ping timeout); the stream leaves once the app hears of it.
            if not transport.is_closing():
                # A write that fills the buffer pauses the transport, whose member leaves the
                # lane at once (`FrameWriter.on_blocked`): the next tick queues for it.
                transport.write(data)
                written += 1
        return written * count

    def _sweep_lane(self, lane: _Lane, now: float) -> None:
        """Once a second: members written through their transports that could be sent to
        directly now (they joined with bytes still buffered) are; and, a safety net, members
        whose transport is closing leave. The protocol takes a closing connection off its lane
        (every close passes through `WatchedTransport`), but were one missed, its socket would
        stay open for as long as the lane holds its descriptor."""
        lane.sweep_at = now + _SWEEP_SECONDS
        for outbox, transport in list(lane.members.items()):
            if transport.is_closing():
                logger.info("hub: a closing connection was still on the %s lane", lane.symbol)
                self.leave_lane(outbox)
            elif not lane.is_direct(outbox) and outbox.direct is not None:
                fd = self._direct_fd(outbox.direct)
                if fd is not None:
                    lane.send_directly(outbox, fd)

    def _expire_lane(self, lane: _Lane, now: float) -> None:
        """Members whose token is due go back to `offer`, which sends them nothing more."""
        for outbox in [o for o in lane.members if o.deadline <= now]:
            self.leave_lane(outbox)
        lane.deadline = min((o.deadline for o in lane.members), default=math.inf)

    def _join_lane(self, outbox: Outbox, now: float) -> None:
        symbol = outbox.lane_symbol()
        if symbol is None or outbox.deadline <= now:
            return
        direct = outbox.direct
        if (
            direct is None
            or outbox._floor.get(symbol) != self._last_seq.get(symbol)  # behind, or ahead
            or not direct.keeping_up()
        ):
            return
        streams = self._streams.get(symbol)
        if streams is None or outbox not in streams:
            return
        lanes = self._lanes.get(symbol)
        if lanes is None:
            lanes = self._lanes[symbol] = (_Lane(self, symbol, False), _Lane(self, symbol, True))
        streams.discard(outbox)
        direct.on_blocked = outbox.leave_lane
        # No descriptor while its transport holds bytes: the sweep sends to it directly later.
        lanes[outbox.batch].add(outbox, direct.transport, self._direct_fd(direct))

    def _direct_fd(self, writer: FrameWriter) -> int | None:
        """A descriptor for the C send loop to reach this connection by, when allowed."""
        if self._direct_writes and self.direct_held < self.direct_limit:
            return writer.duplicate_fd()
        return None

    def leave_lane(self, outbox: Outbox) -> None:
        lane = outbox.lane
        if lane is None:
            return
        lane.remove(outbox)
        if outbox.direct is not None:
            outbox.direct.on_blocked = None
        symbol = lane.symbol
        # Every tick up to the hub's last one went to the lane (nothing is pending between
        # bursts, and a pause comes from the write that carried the burst's last tick).
        outbox._floor[symbol] = self._last_seq[symbol]
        self._streams.setdefault(symbol, set()).add(outbox)

    async def _repair_gap(
        self,
        symbol: str,
        last: int,
        upto: int,
        dirty: list[Outbox],
        lanes: dict[str, list[tuple[Tick, bytes]]],
    ) -> None:
        """The broker skipped seqs (a reconnect, a producer crash between store and publish):
        refetch them from the store, where the producer wrote them first."""
        try:
            missing = await asyncio.wait_for(
                self._store.read_history(
                    symbol, since=last, limit=min(upto - last - 1, self._retention)
                ),
                _REPAIR_TIMEOUT_SECONDS,
            )
        except Exception as exc:  # noqa: BLE001 - a failed repair leaves a visible seq jump
            logger.warning(
                "hub: could not refetch %s seq %d..%d: %s", symbol, last + 1, upto - 1, exc
            )
            return
        for tick in missing:
            if tick.seq < upto:
                metrics.GAPS_REPAIRED.inc()
                self._deliver(tick, dirty, lanes)

    def _deliver(
        self, tick: Tick, dirty: list[Outbox], lanes: dict[str, list[tuple[Tick, bytes]]]
    ) -> None:
        symbol = tick.symbol
        last = self._last_seq.get(symbol)
        if last is not None and tick.seq <= last:
            return  # already passed on (a redelivery, or a repair that raced the live tick)
        self._last_seq[symbol] = tick.seq
        self._latest[symbol] = tick
        metrics.TICKS_RECEIVED.inc()
        outboxes = self._streams.get(symbol)
        lane = self._lanes.get(symbol)
        in_lanes = lane is not None and bool(lane[0].members or lane[1].members)
        if not outboxes and not in_lanes:
            return
        wire = text_frame(tick.frame.encode())  # encoded once, written to every subscriber
        if in_lanes:
            lanes.setdefault(symbol, []).append((tick, wire))  # written in `_flush`
        if outboxes:
            for outbox in outboxes:
                if outbox.offer(tick, wire):
                    dirty.append(outbox)

    async def attach(self, outbox: Outbox, symbol: str, *, since: int | None) -> None:
        """Subscribe `outbox` to `symbol`: a snapshot (or the retained ticks after `since`),
        then every live tick, with no gap and no duplicate between the two."""
        if outbox.closed:
            return
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
            if latest is not None:
                if since is None or since > latest.seq:
                    # No resume point, or one from a future we never produced: start afresh.
                    initial = [Frame(symbol, latest.seq, latest.snapshot_frame, "snapshot")]
                    floor, first_live_is_snapshot = 0, False
                elif since < latest.seq:
                    history = await self._store.read_history(
                        symbol, since=since, limit=self._retention
                    )
                    initial = [Frame(t.symbol, t.seq, t.frame, "replay") for t in history]
        finally:
            outbox.end_sync(
                symbol, initial, floor=floor, first_live_is_snapshot=first_live_is_snapshot
            )
            if outbox.closed:  # its stream closed while the store answered
                self.detach(outbox, [symbol])

    def detach(self, outbox: Outbox, symbols: Iterable[str]) -> None:
        outbox.leave_lane()
        for symbol in list(symbols):
            streams = self._streams.get(symbol)
            if streams is not None and outbox in streams:
                streams.discard(outbox)
                metrics.SUBSCRIPTIONS.dec()
            outbox.remove(symbol)
