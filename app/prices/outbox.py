"""One stream's pending frames: what it has yet to be sent, and the rules that keep that bounded.

An `Outbox` owns its stream's per-symbol floors (the highest seq enqueued or written: nothing at
or below it is taken again), the ticks held while a symbol's snapshot loads, conflation (past
its limit, only the newest frame of each symbol stays) and the corked direct writes of one
burst (`offer`, then `flush` once the burst ends).

Where its ticks come from is the hub's (app/prices/hub.py); whether it rides a lane, the fast
path, is app/prices/lanes.py's: `Lanes.join` and `Lanes.leave` are the only ways on and off,
and tell the outbox through `joined_lane` / `left_lane`. `lane` is the answer, to read only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from app import metrics
from app.frames import FrameWriter
from app.prices.ticks import Tick, as_snapshot
from app.prices.wire import batch_frame

if TYPE_CHECKING:
    from app.prices.lanes import Lane


@dataclass(slots=True)
class Frame:
    symbol: str
    seq: int
    text: str
    # "tick", "snapshot", "replay" (a stored tick sent for `since`), "reset" (a snapshot
    # marked `"reset": true`, after ticks stored nowhere), "control"
    event: str

    @property
    def pinned(self) -> bool:
        """Never conflated away: a reset must reach the client, or its jump is silent."""
        return self.event == "replay" or self.event == "control" or self.event == "reset"


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
        "_reset_while_syncing",
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
        # Subscribed before the symbol's first tick: symbol -> the client's resume point (-1:
        # none). A first tick at or below it is a `reset`: the feed restarted below the client.
        self._awaiting_snapshot: dict[str, int] = {}
        self._reset_while_syncing: set[str] = set()  # the held ticks start with a reset
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
        # The lane it rides (app/prices/lanes.py), None off the fast path: written only through
        # `joined_lane` / `left_lane`, which only `Lanes` calls.
        self.lane: Lane | None = None
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
            lane.owner.leave(self)

    def joined_lane(self, lane: Lane) -> None:
        """`Lanes.join` put it on `lane`: from now on the lane counts what it is sent."""
        self.lane = lane
        self._lane_mark = lane.delivered

    def left_lane(self, seq: int) -> None:
        """`Lanes.leave` took it off its lane, which had sent it every tick of the lane's
        symbol up to `seq`: `offer` takes it on from the next one."""
        lane = self.lane
        assert lane is not None
        self._sent += lane.delivered - self._lane_mark
        self.lane = None
        self._floor[lane.symbol] = seq

    def floor_of(self, symbol: str) -> int | None:
        """The highest seq of `symbol` enqueued or written; None while not subscribed (or its
        snapshot loads)."""
        return self._floor.get(symbol)

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
            self._enqueue(self._first_frame(tick, self._awaiting_snapshot.pop(symbol)))
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

    def reset(self, tick: Tick) -> None:
        """The hub's feed of `tick`'s symbol starts afresh at `tick` (the ticks before it are
        stored nowhere, or its seq went back): a `reset` snapshot, whatever the floor was,
        then ticks from its seq on. Its caller took it off its lane first."""
        symbol = tick.symbol
        held = self._syncing.get(symbol)
        if held is not None:  # its snapshot or replay is loading: that one is stale now
            held[:] = [tick]
            self._reset_while_syncing.add(symbol)
            return
        if symbol not in self._floor:
            return
        self._awaiting_snapshot.pop(symbol, None)
        self._pin(Frame(symbol, tick.seq, tick.reset_frame, "reset"))

    def flush(self, now: float) -> int:
        """Write what `offer` corked, in one write; how many frames that carried."""
        direct = self.direct
        if self._corked_texts:  # batch mode: one frame, an array when there are several
            texts, self._corked_texts = self._corked_texts, []
            count = len(texts)
            data = batch_frame(texts)
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
        self,
        symbol: str,
        initial: list[Frame],
        *,
        floor: int,
        first_live_is_snapshot: bool,
        since: int | None = None,
    ) -> None:
        """Enqueue the snapshot/history frames, then the live ticks held meanwhile. With
        `first_live_is_snapshot` (no tick existed yet), the first live tick is the snapshot,
        or with a resume point `since` a tick, or a `reset` snapshot if at or below `since`."""
        resume = -1 if since is None else since
        held = self._syncing.pop(symbol, None)
        if held is None:  # unsubscribed while loading
            return
        if symbol in self._reset_while_syncing:  # what loaded is from before the reset
            self._reset_while_syncing.discard(symbol)
            self._floor[symbol] = held[0].seq - 1
            self._pin(Frame(symbol, held[0].seq, held[0].reset_frame, "reset"))
            initial, held, first_live_is_snapshot = [], held[1:], False
        else:
            self._floor[symbol] = floor
        for frame in initial:
            self._enqueue(frame)
        for tick in held:
            if tick.seq <= self._floor[symbol]:
                continue
            if first_live_is_snapshot:
                # No tick existed yet when the stream opened: the first one is its snapshot.
                self._enqueue(self._first_frame(tick, resume))
                first_live_is_snapshot = False
            else:
                self._push(Frame(tick.symbol, tick.seq, tick.frame, "tick"))
        if first_live_is_snapshot:
            self._awaiting_snapshot[symbol] = resume

    def _enqueue(self, frame: Frame) -> None:
        if frame.pinned:
            self._pin(frame)
        else:
            self._push(frame)

    @staticmethod
    def _first_frame(tick: Tick, resume: int) -> Frame:
        """The first tick of a feed that had none when the stream opened: its snapshot (no
        resume point), a tick after the client's resume point, or a `reset` snapshot when the
        client resumed from a seq this feed is not past (it restarted below it)."""
        if resume < 0:
            return Frame(tick.symbol, tick.seq, tick.snapshot_frame, "snapshot")
        if tick.seq <= resume:
            metrics.RESETS.labels(where="resume").inc()
            return Frame(tick.symbol, tick.seq, tick.reset_frame, "reset")
        return Frame(tick.symbol, tick.seq, tick.frame, "tick")

    def remove(self, symbol: str) -> None:
        self._floor.pop(symbol, None)
        self._syncing.pop(symbol, None)
        self._reset_while_syncing.discard(symbol)
        self._awaiting_snapshot.pop(symbol, None)
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
