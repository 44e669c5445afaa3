"""What the fan-out's tests share: ticks, a slow store, a fake connection written to directly,
and a hub consuming from an in-memory broker."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson
import pytest

from app.broker import Broker, price_channel
from app.history.service import History
from app.prices.hub import FanoutHub
from app.prices.outbox import Outbox
from app.prices.store import MemoryTickStore
from app.prices.ticks import Tick, encode_tick
from app.prices.wire import text_frame
from tests.support import FAST_UNAVAILABLE, NEEDS_FAST


def tick(symbol: str, seq: int, *, ts: int | None = None) -> Tick:
    """Tick `seq` of `symbol`; its ts (ms) is `ts` where the test is about timing."""
    return encode_tick(
        symbol=symbol,
        price=Decimal("100.0000") + seq,
        ts=1_764_300_000_000 + seq if ts is None else ts,
        seq=seq,
        bid=Decimal("99.9900"),
        ask=Decimal("100.0100"),
        volume=Decimal(1),
    )


def offer(outbox: Outbox, t: Tick) -> None:
    outbox.offer(t, text_frame(t.frame.encode()))


async def received(outbox: Outbox, last: int, *, so_far: Iterable[int] = ()) -> list[int]:
    """The seqs `outbox` queues after `so_far` (drained already), polled until `last` (or 3 s)."""
    seqs = list(so_far)
    for _ in range(300):
        if seqs and seqs[-1] == last:
            break
        await asyncio.sleep(0.01)
        seqs += [f.seq for f in outbox.drain()]
    return seqs


class SlowStore(MemoryTickStore):
    """A store whose reads take a while, like Redis under load."""

    history_reads = 0

    async def read_history(self, symbol: str, *, since: int | None, limit: int) -> list[Tick]:
        self.history_reads += 1
        await asyncio.sleep(0.1)
        return await super().read_history(symbol, since=since, limit=limit)

    async def read_latest(self, symbols):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.1)
        return await super().read_latest(symbols)


class FakeTransport:
    """The parts of a transport the hub's fast path uses. Past `pause_at` buffered bytes it
    pauses its protocol, as asyncio and uvloop transports do at their high-water mark."""

    def __init__(self, protocol: FakeProtocol, pause_at: int | None) -> None:
        self.protocol = protocol
        self.pause_at = pause_at
        self.buffered = 0
        self.closing = False
        self.writes: list[tuple[float, bytes]] = []

    def write(self, data: bytes) -> None:
        self.writes.append((time.time(), data))
        if self.pause_at is not None:
            was = self.buffered
            self.buffered += len(data)
            if was <= self.pause_at < self.buffered:
                self.protocol.pause_writing()

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default  # no socket: the hub writes through `write`

    def frames(self) -> list[Any]:
        """Every frame written, decoded (a batch frame stays a list)."""
        return parse_frames(b"".join(data for _, data in self.writes))

    def seqs(self) -> list[int]:
        return tick_seqs(self.frames())


def parse_frames(data: bytes) -> list[Any]:
    """Server frames back to back, decoded; fails on anything but whole text frames."""
    out: list[Any] = []
    pos = 0
    while pos < len(data):
        assert data[pos] == 0x81, "one final text frame after another"
        length, pos = data[pos + 1], pos + 2
        if length == 126:
            length, pos = int.from_bytes(data[pos : pos + 2], "big"), pos + 2
        assert pos + length <= len(data), "a frame cut short"
        out.append(orjson.loads(data[pos : pos + length]))
        pos += length
    return out


def tick_seqs(frames: list[Any]) -> list[int]:
    seqs: list[int] = []
    for frame in frames:
        for item in frame if isinstance(frame, list) else [frame]:
            if item.get("type") in (None, "tick", "snapshot"):
                seqs.append(item["seq"])
    return seqs


class FakeProtocol:
    """What FrameWriter reads of uvicorn's protocol."""

    def __init__(self, pause_at: int | None = None) -> None:
        if FAST_UNAVAILABLE:
            pytest.skip(NEEDS_FAST.kwargs["reason"])
        from app.server.direct_writes import SocketFrameWriter  # only once admitted

        self.close_sent = False
        self.disconnected = False
        self.transport = self.raw_transport = FakeTransport(self, pause_at)
        self.writer = SocketFrameWriter(self)  # type: ignore[arg-type]

    def pause_writing(self) -> None:
        self.writer.blocked()


def direct_outbox(protocol: FakeProtocol, *, limit: int = 64, batch: bool = False) -> Outbox:
    """An outbox written straight to `protocol`, with a writer that drains what queues."""

    def drain_soon() -> None:
        asyncio.get_running_loop().call_soon(drain)

    def drain() -> None:
        if not protocol.writer.keeping_up():
            return  # the real writer waits for the transport to drain: a stalled reader
        frames = outbox.drain()
        if frames:
            protocol.writer.write(b"".join(text_frame(f.text.encode()) for f in frames))
        outbox.flushed()

    outbox = Outbox(limit=limit, on_queued=drain_soon, direct=protocol.writer)
    outbox.batch = batch
    return outbox


@dataclass
class Fanout:
    """A hub consuming from an in-memory broker, and what it reads: see `consuming_hub`."""

    hub: FanoutHub
    broker: Broker
    store: MemoryTickStore
    symbols: list[str]
    consumers: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def consumer(self) -> asyncio.Task[None]:
        """The newest `consume` run."""
        return self.consumers[-1]

    async def restart(self) -> None:
        """`consume` started (again, as the supervisor does once it ended); it runs until the
        end of `consuming_hub`."""
        self.consumers.append(asyncio.create_task(self.hub.consume()))
        await asyncio.sleep(0.05)  # the consumer has subscribed

    async def send(self, *ticks: Tick) -> None:
        """Each of `ticks` stored and then published, as the producer does."""
        for t in ticks:
            await self.store.append(t, {}, fence=None)
            await self.broker.publish(price_channel(t.symbol), t.frame)

    async def produce(self, symbol: str, seqs: Iterable[int]) -> None:
        """Ticks `seqs` of `symbol` sent back to back."""
        await self.send(*(tick(symbol, seq) for seq in seqs))

    async def publish(self, symbol: str, seqs: Iterable[int], burst: int = 1) -> None:
        """Ticks `seqs` of `symbol` sent, the hub running after every `burst` of them."""
        for i, seq in enumerate(seqs, 1):
            await self.send(tick(symbol, seq))
            if i % burst == 0:
                for _ in range(3):
                    await asyncio.sleep(0)
        for _ in range(10):
            await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def consuming_hub(
    *symbols: str,
    store: MemoryTickStore | None = None,
    retention: int = 1000,
    max_lag_ms: int = 50,
    direct_writes: bool = True,
    attach_first: Iterable[Outbox] = (),
    history: History | None = None,
) -> AsyncIterator[Fanout]:
    """A hub over `store` (by default an empty one; `history`: the window and a database)
    consuming `symbols` from a connected
    in-memory broker, once every outbox in `attach_first` is attached to each symbol (its
    snapshot taken before anything is consumed). Consuming stops, and the broker disconnects,
    at the end."""
    broker = Broker("memory://")
    await broker.connect()
    if store is None:
        store = MemoryTickStore(retention=retention, candles_kept=10)
    hub = FanoutHub(
        broker=broker,
        store=store,
        retention=retention,
        max_lag_ms=max_lag_ms,
        direct_writes=direct_writes,
        history=history,
    )
    hub.lanes.direct_limit = 1000  # whatever this process's open-file limit: descriptors to spare
    fanout = Fanout(hub=hub, broker=broker, store=store, symbols=list(symbols))
    await hub.follow(symbols)
    try:
        for outbox in attach_first:
            for symbol in symbols:
                await hub.attach(outbox, symbol, since=None, subject="tester")
        await fanout.restart()
        yield fanout
    finally:
        for consumer in fanout.consumers:
            consumer.cancel()
        await asyncio.gather(*fanout.consumers, return_exceptions=True)
        await broker.disconnect()


@contextlib.asynccontextmanager
async def running_hub(
    *symbols: str, direct_writes: bool = True
) -> AsyncIterator[tuple[FanoutHub, Callable[..., Any]]]:
    """A hub consuming `symbols`, and `publish(symbol, seqs, burst=1)`: ticks through the
    broker, the hub running after every `burst` of them."""
    async with consuming_hub(*symbols, direct_writes=direct_writes) as fanout:
        yield fanout.hub, fanout.publish


async def direct_subscriber(
    hub: FanoutHub,
    publish: Callable[..., Any],
    *symbols: str,
    protocol: FakeProtocol | None = None,
    **outbox_kw: Any,
) -> tuple[FakeProtocol, Outbox]:
    """A connection written to directly, subscribed to `symbols` after each has a first tick
    (seq 1, its snapshot)."""
    for symbol in symbols:
        await publish(symbol, [1])
    protocol = protocol or FakeProtocol()
    outbox = direct_outbox(protocol, **outbox_kw)
    for symbol in symbols:
        await hub.attach(outbox, symbol, since=None, subject="tester")
    return protocol, outbox
