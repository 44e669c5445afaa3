"""The fan-out's fast path: lanes, and the one place that puts a stream on one or takes it off.

A lane holds the connections subscribed to one symbol (and one frame shape: plain, or batch
arrays) that are up to date, keeping up and have nothing queued. At the end of a burst the hub
hands `Lanes.write` each symbol's frames (encoded once); every lane member gets them from one C
loop over descriptors the lane holds (`_fanout.c`: one `send()` each), or, for members it may
not send to that way, one `transport.write` each in a plain Python loop: no per-connection
Python call, no state update.

Who owns what:
- `Lanes` owns lane membership. `Lanes.join` and `Lanes.leave` are the only ways on and off:
  they alone add to and remove from a lane, set and clear the connection's
  `FrameWriter.on_blocked` (the server's signal to leave at once: its transport paused, or a
  close is under way), and tell the outbox (`Outbox.joined_lane` / `left_lane`), so
  `outbox.lane` is the one answer to "is this connection on the fast path". A lane member is
  in none of the hub's per-tick sets: `join` and `leave` move it out of and back into them
  through the hub's two callbacks.
- `Lanes` also owns the descriptor budget (`direct_limit`, `direct_held`): each member sent to
  directly holds a descriptor of its own, taken only from what the open-file limit leaves
  beyond every connection the process may accept and `_FD_RESERVE`.
- A member leaves the moment it stops qualifying: its transport pauses writing, a protocol
  frame queues, it subscribes to more, its token is due (`Lane` expires it), it closes, or a
  send to it falls short. It resumes on the per-tick path (`Outbox.offer`) from the seq its
  lane got to, the last one the hub passed on.
"""

from __future__ import annotations

import logging
import math
import os
import resource
from array import array
from collections.abc import Callable, Mapping

from app import metrics
from app.frames import FrameWriter, Transport
from app.prices.outbox import Outbox
from app.prices.ticks import Tick
from app.prices.wire import batch_frame

send_all: Callable[[array[int], bytes, array[int]], None] | None
try:  # the lanes' send loop in C; optional (a build without a compiler writes in Python)
    from app.prices._fanout import send_all
except ImportError:  # pragma: no cover - depends on the build
    send_all = None

logger = logging.getLogger(__name__)

DIRECT_WRITES_AVAILABLE = send_all is not None
_SWEEP_SECONDS = 1.0  # how often a lane looks for members whose transport closed under it
_FD_RESERVE = 1024  # descriptors kept for what is not a stream (see `direct_limit`)


def direct_limit(max_connections: int) -> int:
    """How many lane members may hold a descriptor of their own: what the process's open-file
    limit leaves beyond `max_connections` streams and a reserve for everything else."""
    soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(0, soft_limit - max_connections - _FD_RESERVE)


class Lane:
    """The outboxes of one symbol (and one frame shape) written to in a plain loop.

    Members are up to date: each has been sent every tick of the symbol up to the hub's last
    passed-on seq, so they need no per-tick bookkeeping. `delivered` counts the ticks written
    to the lane, so a member's own count is what it grew by while the member was in it."""

    __slots__ = (
        "owner",
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

    def __init__(self, owner: Lanes, symbol: str, batch: bool) -> None:
        self.owner = owner
        self.symbol = symbol
        self.batch = batch
        self.members: dict[Outbox, Transport] = {}
        # Members sent to directly, each by a descriptor of its own (closed when it leaves);
        # the others are written through their transports.
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
        """Whether this member is send()-ed to directly."""
        return outbox in self._fds

    def add(self, outbox: Outbox, transport: Transport, fd: int | None) -> None:
        """A new member, sent to through `fd` when it has one (called by `Lanes.join` only)."""
        self.members[outbox] = transport
        if fd is not None:
            self.send_directly(outbox, fd)
        self._transports = None
        metrics.LANE_MEMBERS.inc()
        if outbox.deadline < self.deadline:
            self.deadline = outbox.deadline

    def send_directly(self, outbox: Outbox, fd: int) -> None:
        """From now on `outbox` is sent to through `fd`, which the lane closes when it leaves."""
        self._fds[outbox] = fd
        self._direct = None
        self._transports = None
        self.owner.direct_held += 1

    def remove(self, outbox: Outbox) -> None:
        """A member no more; its descriptor is closed (called by `Lanes.leave` only)."""
        del self.members[outbox]
        fd = self._fds.pop(outbox, None)
        if fd is not None:
            self._direct = None
            self.owner.direct_held -= 1
            os.close(fd)
        self._transports = None
        metrics.LANE_MEMBERS.dec()

    def write(self, data: bytes, count: int, now: float) -> int:
        """`data` (frames for `count` ticks) to every member; how many ticks that sent."""
        if now >= self.deadline:
            self._expire(now)
        if now >= self.sweep_at:
            self._sweep(now)
        self.delivered += count
        written = 0
        fds, direct, failed = self.direct()
        if direct:
            assert send_all is not None
            send_all(fds, data, failed)  # allocates nothing: it cannot fail halfway
            written = len(direct)
            for i in range(1, 1 + 3 * failed[0], 3):
                # A full socket (or a dead peer): the transport takes the rest, in order, and
                # the member leaves; it rejoins, sent to directly again, once its transport
                # has drained. A dead peer's transport meets the same error and closes.
                outbox, sent = direct[failed[i]], failed[i + 1]
                transport = self.members[outbox]
                self.owner.leave(outbox)
                if transport.is_closing():
                    written -= 1
                else:
                    transport.write(data[sent:])
        for transport in self.transports():
            # A transport closing under us: uvicorn wrote its close frame (a peer's close,
            # shutdown, ping timeout); the stream leaves once the app hears of it.
            if not transport.is_closing():
                # A write that fills the buffer pauses the transport, whose member leaves the
                # lane at once (`FrameWriter.on_blocked`): the next tick queues for it.
                transport.write(data)
                written += 1
        return written * count

    def _sweep(self, now: float) -> None:
        """Once a second: members written through their transports that could be sent to
        directly now (they joined with bytes still buffered) are; and, a safety net, members
        whose transport is closing leave. The protocol takes a closing connection off its lane
        (every close passes through `WatchedTransport`), but were one missed, its socket would
        stay open for as long as the lane holds its descriptor."""
        self.sweep_at = now + _SWEEP_SECONDS
        for outbox, transport in list(self.members.items()):
            if transport.is_closing():
                logger.info("hub: a closing connection was still on the %s lane", self.symbol)
                self.owner.leave(outbox)
            elif not self.is_direct(outbox) and outbox.direct is not None:
                fd = self.owner.direct_fd(outbox.direct)
                if fd is not None:
                    self.send_directly(outbox, fd)

    def _expire(self, now: float) -> None:
        """Members whose token is due go back to `offer`, which sends them nothing more."""
        for outbox in [o for o in self.members if o.deadline <= now]:
            self.owner.leave(outbox)
        self.deadline = min((o.deadline for o in self.members), default=math.inf)


class Lanes:
    """Every lane of one hub, per symbol a plain and a batch one; the owner of membership.

    `last_seq`: the seq the hub last passed on, per symbol (the sequencer's, read only). The
    hub's callbacks: `stop_offering(outbox, symbol)` takes a joining member out of the hub's
    per-tick set (False: it is not subscribed there, and stays off); `offer_again(outbox,
    symbol)` puts a leaving one back."""

    def __init__(
        self,
        *,
        last_seq: Mapping[str, int],
        stop_offering: Callable[[Outbox, str], bool],
        offer_again: Callable[[Outbox, str], None],
        direct_writes: bool = True,
        max_connections: int = 10_000,
    ) -> None:
        self._last_seq = last_seq
        self._stop_offering = stop_offering
        self._offer_again = offer_again
        self.by_symbol: dict[str, tuple[Lane, Lane]] = {}  # indexed by `Outbox.batch`
        # Members sent to by the C loop (app/prices/_fanout.c), when it was built.
        self._direct_writes = direct_writes and DIRECT_WRITES_AVAILABLE
        # Each member sent to directly holds a second descriptor. Those come only out of what
        # the open-file limit leaves beyond every connection this process may accept and a
        # reserve (requests, the database, Redis, logs): a direct send never costs a client
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

    @property
    def member_count(self) -> int:
        return sum(len(lane.members) for lanes in self.by_symbol.values() for lane in lanes)

    def write(self, pending: dict[str, list[tuple[Tick, bytes]]], now: float) -> int:
        """A burst's ticks (each with its encoded frame), per symbol, to that symbol's lanes;
        how many messages that sent."""
        sent = 0
        by_symbol = self.by_symbol
        for symbol, ticks in pending.items():
            plain, batch = by_symbol[symbol]
            count = len(ticks)
            if plain.members:
                data = ticks[0][1] if count == 1 else b"".join(wire for _, wire in ticks)
                sent += plain.write(data, count, now)
            if batch.members:
                data = ticks[0][1] if count == 1 else batch_frame([t.frame for t, _ in ticks])
                sent += batch.write(data, count, now)
        return sent

    def join(self, outbox: Outbox, now: float) -> None:
        """Put `outbox` on its symbol's lane if it qualifies: one symbol, written directly,
        nothing queued, its token not due, keeping up, and sent exactly up to the hub's last
        seq of that symbol."""
        symbol = outbox.lane_symbol()
        if symbol is None or outbox.deadline <= now:
            return
        direct = outbox.direct
        if (
            direct is None
            or outbox.floor_of(symbol) != self._last_seq.get(symbol)  # behind, or ahead
            or not direct.keeping_up()
            or not self._stop_offering(outbox, symbol)
        ):
            return
        lanes = self.by_symbol.get(symbol)
        if lanes is None:
            lanes = self.by_symbol[symbol] = (Lane(self, symbol, False), Lane(self, symbol, True))
        lane = lanes[outbox.batch]
        direct.on_blocked = outbox.leave_lane
        # No descriptor while its transport holds bytes: the sweep sends to it directly later.
        lane.add(outbox, direct.transport, self.direct_fd(direct))
        outbox.joined_lane(lane)

    def leave(self, outbox: Outbox) -> None:
        """Take `outbox` off its lane, back to the hub's per-tick path."""
        lane = outbox.lane
        if lane is None:
            return
        lane.remove(outbox)
        if outbox.direct is not None:
            outbox.direct.on_blocked = None
        symbol = lane.symbol
        # Every tick up to the hub's last one went to the lane (nothing is pending between
        # bursts, and a pause comes from the write that carried the burst's last tick).
        outbox.left_lane(self._last_seq[symbol])
        self._offer_again(outbox, symbol)

    def direct_fd(self, writer: FrameWriter) -> int | None:
        """A descriptor for the C send loop to reach this connection by, when allowed."""
        if self._direct_writes and self.direct_held < self.direct_limit:
            return writer.duplicate_fd()
        return None
