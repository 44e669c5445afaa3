"""The outbox and the hub, in process: ordering, deduplication, bounded memory, conflation."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable
from decimal import Decimal
from typing import Any, cast

import orjson
import pytest
from prometheus_client import REGISTRY

from app.broker import Broker, price_channel
from app.prices.hub import DIRECT_WRITES_AVAILABLE, FanoutHub, Outbox, direct_limit
from app.prices.store import MemoryTickStore
from app.prices.ticks import Tick, encode_tick
from app.prices.wire import text_frame
from app.server.protocol import HIGH_WATER_BYTES, SocketFrameWriter, WatchedTransport


def tick(symbol: str, seq: int) -> Tick:
    return encode_tick(
        symbol=symbol,
        price=Decimal("100.0000") + seq,
        ts=1_764_300_000_000 + seq,
        seq=seq,
        bid=Decimal("99.9900"),
        ask=Decimal("100.0100"),
        volume=Decimal(1),
    )


def offer(outbox: Outbox, t: Tick) -> None:
    outbox.offer(t, text_frame(t.frame.encode()))


def subscribed_outbox(*symbols: str, limit: int = 16) -> Outbox:
    outbox = Outbox(limit=limit, on_queued=lambda: None)
    for symbol in symbols:
        outbox.begin_sync(symbol)
        outbox.end_sync(symbol, [], floor=0, first_live_is_snapshot=False)
    return outbox


class TestOutbox:
    def test_keeps_every_tick_while_under_its_limit(self) -> None:
        outbox = subscribed_outbox("AAPL")
        for seq in range(1, 11):
            offer(outbox, tick("AAPL", seq))
        assert [f.seq for f in outbox.drain()] == list(range(1, 11))
        assert outbox.conflated == 0

    def test_drops_duplicates_and_older_ticks(self) -> None:
        outbox = subscribed_outbox("AAPL")
        for seq in (1, 2, 2, 1, 3):
            offer(outbox, tick("AAPL", seq))
        assert [f.seq for f in outbox.drain()] == [1, 2, 3]

    def test_ignores_symbols_not_subscribed(self) -> None:
        outbox = subscribed_outbox("AAPL")
        offer(outbox, tick("MSFT", 1))
        assert outbox.drain() == []

    def test_a_stuck_reader_stays_bounded_and_sees_a_seq_jump(self) -> None:
        outbox = subscribed_outbox("AAPL", "MSFT", limit=16)
        for seq in range(1, 10_001):
            offer(outbox, tick("AAPL", seq))
            offer(outbox, tick("MSFT", seq))
        assert len(outbox) <= 16
        frames = outbox.drain()
        by_symbol = {s: [f.seq for f in frames if f.symbol == s] for s in ("AAPL", "MSFT")}
        for seqs in by_symbol.values():
            assert seqs[-1] == 10_000, "the latest tick always survives"
            assert seqs == sorted(seqs), "still in seq order"
            assert len(seqs) < 10_000, "older ticks were conflated: a visible seq jump"
        assert outbox.conflated == 20_000 - len(frames)

    def test_control_frames_survive_conflation(self) -> None:
        outbox = subscribed_outbox("AAPL", limit=16)
        outbox.push_control('{"type":"pong"}')
        for seq in range(1, 100):
            offer(outbox, tick("AAPL", seq))
        texts = [f.text for f in outbox.drain()]
        assert texts[0] == '{"type":"pong"}'

    def test_live_ticks_during_sync_follow_the_snapshot_without_duplicates(self) -> None:
        outbox = Outbox(limit=64, on_queued=lambda: None)
        outbox.begin_sync("AAPL")
        for seq in (5, 6, 7):  # live ticks arrive while the snapshot (seq 6) is loading
            offer(outbox, tick("AAPL", seq))
        snapshot = tick("AAPL", 6)
        from app.prices.hub import Frame

        outbox.end_sync(
            "AAPL",
            [Frame("AAPL", 6, snapshot.snapshot_frame, "snapshot")],
            floor=0,
            first_live_is_snapshot=False,
        )
        offer(outbox, tick("AAPL", 8))
        frames = outbox.drain()
        assert [(f.event, f.seq) for f in frames] == [("snapshot", 6), ("tick", 7), ("tick", 8)]
        assert frames[0].text.startswith('{"type":"snapshot","symbol":"AAPL"')

    def test_first_live_tick_is_the_snapshot_when_none_existed(self) -> None:
        outbox = Outbox(limit=64, on_queued=lambda: None)
        outbox.begin_sync("AAPL")
        outbox.end_sync("AAPL", [], floor=0, first_live_is_snapshot=True)
        offer(outbox, tick("AAPL", 1))
        offer(outbox, tick("AAPL", 2))
        assert [f.event for f in outbox.drain()] == ["snapshot", "tick"]


class TestFanoutHub:
    async def test_fast_reader_keeps_every_tick_while_slow_one_is_conflated(self) -> None:
        broker = Broker("memory://")
        await broker.connect()
        store = MemoryTickStore(retention=1000, candles_kept=10)
        hub = FanoutHub(broker=broker, store=store, retention=1000)
        consumer = asyncio.create_task(hub.consume(["AAPL"]))
        try:
            fast, slow = (
                Outbox(limit=32, on_queued=lambda: None),
                Outbox(limit=32, on_queued=lambda: None),
            )
            await hub.attach(fast, "AAPL", since=None)
            await hub.attach(slow, "AAPL", since=None)
            await asyncio.sleep(0.05)  # the consumer has subscribed
            received: list[int] = []
            for seq in range(1, 501):
                t = tick("AAPL", seq)
                await store.append(t, {}, fence=None)
                await broker.publish(price_channel("AAPL"), t.frame)
                if seq % 10 == 0:
                    await asyncio.sleep(0)  # let the hub run
                    received += [f.seq for f in fast.drain()]
            for _ in range(100):
                await asyncio.sleep(0.01)
                received += [f.seq for f in fast.drain()]
                if received and received[-1] == 500:
                    break
            assert received == list(range(1, 501))
            slow_seqs = [f.seq for f in slow.drain()]
            assert len(slow_seqs) <= 32
            assert slow_seqs[-1] == 500
            assert slow.conflated > 0
        finally:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
            await broker.disconnect()

    async def test_gap_in_the_broker_is_refetched_from_the_store(self) -> None:
        broker = Broker("memory://")
        await broker.connect()
        store = MemoryTickStore(retention=1000, candles_kept=10)
        hub = FanoutHub(broker=broker, store=store, retention=1000)
        consumer = asyncio.create_task(hub.consume(["MSFT"]))
        try:
            outbox = Outbox(limit=64, on_queued=lambda: None)
            await hub.attach(outbox, "MSFT", since=None)
            await asyncio.sleep(0.05)
            for seq in range(1, 11):
                t = tick("MSFT", seq)
                await store.append(t, {}, fence=None)
                if seq not in (4, 5, 6):  # the broker lost these three
                    await broker.publish(price_channel("MSFT"), t.frame)
            seqs: list[int] = []
            for _ in range(100):
                await asyncio.sleep(0.01)
                seqs += [f.seq for f in outbox.drain()]
                if seqs and seqs[-1] == 10:
                    break
            assert seqs == list(range(1, 11))
        finally:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
            await broker.disconnect()

    async def test_a_backlog_is_skipped_to_its_newest_ticks_without_refetching(self) -> None:
        """Behind by a burst: ticks older than max_lag_ms vs the newest are skipped (a seq jump
        the client sees), and the hub does not refetch them as if they were a broker gap."""
        broker = Broker("memory://")
        await broker.connect()
        store = MemoryTickStore(retention=1000, candles_kept=10)
        hub = FanoutHub(broker=broker, store=store, retention=1000, max_lag_ms=50)
        outbox = Outbox(limit=64, on_queued=lambda: None)
        first = tick("TSLA", 1)
        await store.append(first, {}, fence=None)
        await hub.attach(outbox, "TSLA", since=None)  # snapshot: seq 1
        consumer = asyncio.create_task(hub.consume(["TSLA"]))
        try:
            await asyncio.sleep(0.05)
            for seq in range(2, 12):  # one burst: 10 ticks, 20 ms apart by their ts
                t = encode_tick(
                    symbol="TSLA",
                    price=Decimal("245.0000"),
                    ts=1_764_300_000_000 + seq * 20,
                    seq=seq,
                    bid=Decimal("244.9900"),
                    ask=Decimal("245.0100"),
                    volume=Decimal(1),
                )
                await store.append(t, {}, fence=None)
                await broker.publish(price_channel("TSLA"), t.frame)
            seqs: list[int] = []
            for _ in range(100):
                await asyncio.sleep(0.01)
                seqs += [f.seq for f in outbox.drain()]
                if seqs and seqs[-1] == 11:
                    break
            assert seqs == [1, 9, 10, 11]
        finally:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
            await broker.disconnect()


class TestRefetch:
    """While a broker gap is refetched from the store, later ticks wait behind it."""

    @staticmethod
    async def published(broker: Broker, store: MemoryTickStore, seqs: Iterable[int]) -> None:
        for seq in seqs:
            t = tick("MSFT", seq)
            await store.append(t, {}, fence=None)
            await broker.publish(price_channel("MSFT"), t.frame)

    @staticmethod
    async def received(outbox: Outbox, last: int) -> list[int]:
        seqs: list[int] = []
        for _ in range(300):
            await asyncio.sleep(0.01)
            seqs += [f.seq for f in outbox.drain()]
            if seqs and seqs[-1] == last:
                break
        return seqs

    @contextlib.asynccontextmanager
    async def hub(self) -> AsyncIterator[tuple[FanoutHub, Broker, SlowStore]]:
        broker = Broker("memory://")
        await broker.connect()
        store = SlowStore(retention=1000, candles_kept=10)  # every read takes 0.1 s
        hub = FanoutHub(broker=broker, store=store, retention=1000)
        consumer = asyncio.create_task(hub.consume(["MSFT"]))
        try:
            await asyncio.sleep(0.05)
            yield hub, broker, store
        finally:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
            await broker.disconnect()

    async def test_ticks_that_arrive_during_a_refetch_follow_it_in_order(self) -> None:
        async with self.hub() as (hub, broker, store):
            outbox = Outbox(limit=256, on_queued=lambda: None)
            await hub.attach(outbox, "MSFT", since=None)
            await self.published(broker, store, [1, 2, 3])
            for seq in (4, 5):  # the broker lost these
                await store.append(tick("MSFT", seq), {}, fence=None)
            for seq in range(6, 31):  # and these come while the refetch waits on the store
                await self.published(broker, store, [seq])
                await asyncio.sleep(0.005)
            assert await self.received(outbox, 30) == list(range(1, 31))
            assert store.history_reads == 1  # one refetch for the one gap, not one per tick

    async def test_a_backlog_past_its_bound_is_refetched_too(self, monkeypatch) -> None:
        monkeypatch.setattr("app.prices.hub._BACKLOG_TICKS", 5)
        dropped = REGISTRY.get_sample_value("pricefeed_hub_backlog_dropped_total") or 0.0
        async with self.hub() as (hub, broker, store):
            outbox = Outbox(limit=256, on_queued=lambda: None)
            await hub.attach(outbox, "MSFT", since=None)
            await self.published(broker, store, [1])
            await store.append(tick("MSFT", 2), {}, fence=None)  # lost by the broker
            await self.published(broker, store, range(3, 41))  # 38 more during the refetch
            assert await self.received(outbox, 40) == list(range(1, 41))
        assert (REGISTRY.get_sample_value("pricefeed_hub_backlog_dropped_total") or 0) > dropped

    async def test_ticks_gone_stale_during_a_refetch_are_skipped(self) -> None:
        """Behind by a refetch: what waited behind the gap goes out as one burst, so ticks
        more than max_lag_ms older than their symbol's newest are skipped (a seq jump)."""
        broker = Broker("memory://")
        await broker.connect()
        store = SlowStore(retention=1000, candles_kept=10)
        hub = FanoutHub(broker=broker, store=store, retention=1000, max_lag_ms=50)
        consumer = asyncio.create_task(hub.consume(["MSFT"]))
        try:
            await asyncio.sleep(0.05)
            outbox = Outbox(limit=256, on_queued=lambda: None)
            await hub.attach(outbox, "MSFT", since=None)

            def at(seq: int, ts: int) -> Tick:
                return encode_tick(
                    symbol="MSFT",
                    price=Decimal("1.0000"),
                    ts=ts,
                    seq=seq,
                    bid=Decimal(1),
                    ask=Decimal(1),
                    volume=Decimal(1),
                )

            start = int(time.time() * 1000)
            for seq, ts in ((1, start), (2, start + 1)):
                await store.append(at(seq, ts), {}, fence=None)
            await broker.publish(price_channel("MSFT"), at(1, start).frame)  # 2 is lost
            await asyncio.sleep(0.02)
            for seq in range(3, 23):  # 10 ms apart by their ts, during the 0.1 s refetch
                t = at(seq, start + 10 * seq)
                await store.append(t, {}, fence=None)
                await broker.publish(price_channel("MSFT"), t.frame)
                await asyncio.sleep(0.001)  # each its own burst
            seqs = await self.received(outbox, 22)
            assert seqs[:3] == [1, 2, 3]  # the refetched tick, and the one at the gap
            assert seqs[-6:] == [17, 18, 19, 20, 21, 22]  # within 50 ms of the newest
            assert len(seqs) == 9  # 4..16 skipped
        finally:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
            await broker.disconnect()

    async def test_every_stream_goes_on_after_a_failure_mid_flush(self) -> None:
        async with running_hub("MSFT", "AAPL") as (hub, publish):
            await publish("MSFT", [1])
            await publish("AAPL", [1])
            protocols = [FakeProtocol(), FakeProtocol()]
            for protocol in protocols:  # watchlists: the corked path, one write per burst
                outbox = direct_outbox(protocol)
                await hub.attach(outbox, "MSFT", since=None)
                await hub.attach(outbox, "AAPL", since=None)
            await publish("MSFT", [2])
            join_lane, calls = hub._join_lane, []

            def fails_once(outbox: Outbox, now: float) -> None:
                calls.append(outbox)
                if len(calls) == 1:
                    raise RuntimeError("a bug")
                join_lane(outbox, now)

            hub._join_lane = fails_once  # type: ignore[method-assign]
            await publish("MSFT", [3])
            consumer = asyncio.create_task(hub.consume(["MSFT", "AAPL"]))  # the supervisor
            await asyncio.sleep(0.05)
            await publish("MSFT", range(4, 10))
            for protocol in protocols:
                assert [s for s in protocol.transport.seqs() if s > 1] == list(range(2, 10))
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)

    async def test_a_failure_in_the_hub_ends_consume_for_its_supervisor(
        self, monkeypatch
    ) -> None:
        broker = Broker("memory://")
        await broker.connect()
        store = MemoryTickStore(retention=1000, candles_kept=10)
        hub = FanoutHub(broker=broker, store=store, retention=1000)
        try:
            consumer = asyncio.create_task(hub.consume(["MSFT"]))
            await asyncio.sleep(0.05)
            with monkeypatch.context() as patch:
                patch.setattr(hub, "_deliver", lambda *a: 1 / 0)
                await self.published(broker, store, [1])
                with pytest.raises(ZeroDivisionError):
                    await asyncio.wait_for(consumer, 5)
            consumer = asyncio.create_task(hub.consume(["MSFT"]))  # what the supervisor does
            await asyncio.sleep(0.05)
            outbox = Outbox(limit=64, on_queued=lambda: None)
            await hub.attach(outbox, "MSFT", since=None)
            await self.published(broker, store, [2, 3])
            assert await self.received(outbox, 3) == [1, 2, 3]  # 1: the snapshot
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
        finally:
            await broker.disconnect()


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


class TestAttach:
    async def test_a_stream_closed_while_its_snapshot_loads_is_not_left_attached(self) -> None:
        store = SlowStore(retention=100, candles_kept=10)
        await store.append(tick("AAPL", 1), {}, fence=None)
        hub = FanoutHub(broker=Broker("memory://"), store=store, retention=100)
        outbox = Outbox(limit=16, on_queued=lambda: None)
        loading = asyncio.create_task(hub.attach(outbox, "AAPL", since=None))
        await asyncio.sleep(0.02)
        outbox.closed = True  # what WebSocketStream.close does
        hub.detach(outbox, outbox.symbols)
        await loading
        assert hub.subscription_count == 0
        await hub.attach(outbox, "MSFT", since=None)  # and a closed outbox is never attached
        assert hub.subscription_count == 0

    async def test_resume_ahead_of_this_hub_replays_nothing_twice(self) -> None:
        """The client came from a faster instance: its `since` is past what this hub passed
        on, but not past the store. No old snapshot, no duplicate."""
        store = MemoryTickStore(retention=100, candles_kept=10)
        broker = Broker("memory://")
        await broker.connect()
        hub = FanoutHub(broker=broker, store=store, retention=100)
        consumer = asyncio.create_task(hub.consume(["AAPL"]))
        try:
            await asyncio.sleep(0.02)
            first = tick("AAPL", 1)
            await store.append(first, {}, fence=None)
            await broker.publish(price_channel("AAPL"), first.frame)
            await asyncio.sleep(0.02)  # the hub has passed on seq 1
            for seq in range(2, 6):  # in the store, not yet through this hub
                await store.append(tick("AAPL", seq), {}, fence=None)
            outbox = Outbox(limit=16, on_queued=lambda: None)
            await hub.attach(outbox, "AAPL", since=4)
            for seq in range(2, 7):
                t = tick("AAPL", seq)
                if seq == 6:
                    await store.append(t, {}, fence=None)
                await broker.publish(price_channel("AAPL"), t.frame)
            for _ in range(50):
                await asyncio.sleep(0.01)
                if len(outbox) >= 2:
                    break
            assert [(f.event, f.seq) for f in outbox.drain()] == [("replay", 5), ("tick", 6)]
        finally:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
            await broker.disconnect()


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
    """What SocketFrameWriter reads of uvicorn's protocol."""

    def __init__(self, pause_at: int | None = None) -> None:
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


@contextlib.asynccontextmanager
async def running_hub(
    *symbols: str, direct_writes: bool = True
) -> AsyncIterator[tuple[FanoutHub, Callable[..., Any]]]:
    """A hub consuming `symbols`, and `publish(symbol, seqs, burst=1)`: ticks through the
    broker, the hub running after every `burst` of them."""
    broker = Broker("memory://")
    await broker.connect()
    store = MemoryTickStore(retention=1000, candles_kept=10)
    hub = FanoutHub(broker=broker, store=store, retention=1000, direct_writes=direct_writes)
    hub.direct_limit = 1000  # whatever this process's open-file limit: descriptors to spare
    consumer = asyncio.create_task(hub.consume(list(symbols)))
    await asyncio.sleep(0.05)  # the consumer has subscribed

    async def publish(symbol: str, seqs: Iterable[int], burst: int = 1) -> None:
        for i, seq in enumerate(seqs, 1):
            t = tick(symbol, seq)
            await store.append(t, {}, fence=None)
            await broker.publish(price_channel(symbol), t.frame)
            if i % burst == 0:
                for _ in range(3):
                    await asyncio.sleep(0)
        for _ in range(10):
            await asyncio.sleep(0.005)

    try:
        yield hub, publish
    finally:
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        await broker.disconnect()


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
        await hub.attach(outbox, symbol, since=None)
    return protocol, outbox


class TestLanes:
    """One-symbol subscribers that keep up ride the hub's lane: written in a plain loop, with
    no per-connection bookkeeping. Whatever makes one leave must not cost it a tick or give
    it one twice."""

    async def test_an_up_to_date_subscriber_rides_the_lane_and_gets_every_tick_once(self) -> None:
        async with running_hub("AAPL") as (hub, publish):
            protocol, outbox = await direct_subscriber(hub, publish, "AAPL")
            await publish("AAPL", range(2, 202))
            assert outbox.lane is not None and hub.lane_count == 1
            assert protocol.transport.seqs() == list(range(1, 202))  # snapshot 1, then live
            assert protocol.transport.frames()[0]["type"] == "snapshot"
            assert outbox.sent >= 195  # the heartbeat's notion of "something went out"

    async def test_metrics_count_lane_members_as_they_join_and_leave(self) -> None:
        def members() -> float:
            return REGISTRY.get_sample_value("pricefeed_fanout_lane_members") or 0.0

        before = members()
        async with running_hub("AAPL", "MSFT") as (hub, publish):
            _, first = await direct_subscriber(hub, publish, "AAPL")
            _, second = await direct_subscriber(hub, publish, "MSFT")
            await publish("AAPL", [2])
            await publish("MSFT", [2])
            assert first.lane is not None and second.lane is not None
            assert members() == before + 2
            await hub.attach(second, "AAPL", since=None)  # a watchlist: off the fast path
            assert members() == before + 1
            hub.detach(first, ["AAPL"])
            assert members() == before

    async def test_a_paused_transport_leaves_the_lane_and_queues_from_the_next_seq(self) -> None:
        async with running_hub("AAPL") as (hub, publish):
            # The reader stalls: the transport buffers until its high-water mark, then pauses.
            protocol, outbox = await direct_subscriber(
                hub,
                publish,
                "AAPL",
                protocol=FakeProtocol(pause_at=HIGH_WATER_BYTES),
                limit=2000,  # large enough not to conflate here
            )
            await publish("AAPL", range(2, 1500))
            assert outbox.lane is None and hub.lane_count == 0
            written = protocol.transport.seqs()
            queued = [f.seq for f in outbox.drain()]
            assert 100 < len(written) < 1000
            assert written + queued == list(range(1, 1500)), "no gap, no duplicate between"

    async def test_a_closing_transport_is_not_written_to(self) -> None:
        async with running_hub("AAPL") as (hub, publish):
            protocol, outbox = await direct_subscriber(hub, publish, "AAPL")
            await publish("AAPL", range(2, 20))
            assert outbox.lane is not None
            protocol.transport.closing = True  # uvicorn wrote a close frame of its own
            before = len(protocol.transport.writes)
            await publish("AAPL", range(20, 40))
            assert len(protocol.transport.writes) == before

    async def test_nothing_is_written_once_the_token_is_due(self) -> None:
        async with running_hub("AAPL") as (hub, publish):
            protocol, outbox = await direct_subscriber(hub, publish, "AAPL")
            await publish("AAPL", range(2, 10))
            assert outbox.lane is not None
            outbox.deadline = due = time.time() + 0.1
            await publish("AAPL", range(10, 20))  # it rejoins the lane with its new deadline
            assert outbox.lane is not None
            await asyncio.sleep(0.15)
            await publish("AAPL", range(20, 30))
            assert outbox.lane is None, "a member whose token is due leaves the lane"
            assert all(at < due for at, _ in protocol.transport.writes)
            assert max(protocol.transport.seqs()) == 19

    async def test_a_protocol_frame_leaves_the_lane_and_the_stream_rejoins_seamlessly(
        self,
    ) -> None:
        async with running_hub("AAPL") as (hub, publish):
            protocol, outbox = await direct_subscriber(hub, publish, "AAPL")
            await publish("AAPL", range(2, 50))
            assert outbox.lane is not None
            outbox.push_control('{"type":"pong"}')
            assert outbox.lane is None
            await publish("AAPL", range(50, 100))
            assert outbox.lane is not None, "back on the lane once the pong went out"
            assert protocol.transport.seqs() == list(range(1, 100))
            assert {"type": "pong"} in protocol.transport.frames()

    async def test_a_second_symbol_takes_it_off_the_lane_with_nothing_lost(self) -> None:
        async with running_hub("AAPL", "MSFT") as (hub, publish):
            await publish("MSFT", [1])
            protocol, outbox = await direct_subscriber(hub, publish, "AAPL")
            await publish("AAPL", range(2, 30))
            assert outbox.lane is not None
            await hub.attach(outbox, "MSFT", since=None)
            assert outbox.lane is None
            await publish("AAPL", range(30, 60))
            await publish("MSFT", range(2, 30))
            assert outbox.lane is None, "a watchlist is corked per burst, not laned"
            frames = protocol.transport.frames()
            aapl = [f["seq"] for f in frames if f["symbol"] == "AAPL"]
            msft = [f["seq"] for f in frames if f["symbol"] == "MSFT"]
            assert aapl == list(range(1, 60)) and msft == list(range(1, 30))
            hub.detach(outbox, ["MSFT"])
            await publish("AAPL", range(60, 80))
            assert outbox.lane is not None, "one symbol again: back on the lane"
            assert [f["seq"] for f in protocol.transport.frames() if f["symbol"] == "AAPL"] == (
                list(range(1, 80))
            )

    async def test_batch_lane_frames_carry_each_burst_in_seq_order(self) -> None:
        async with running_hub("AAPL") as (hub, publish):
            protocol, outbox = await direct_subscriber(hub, publish, "AAPL", batch=True)
            await publish("AAPL", range(2, 10))
            assert outbox.lane is not None and outbox.lane.batch
            await publish("AAPL", range(10, 110), burst=10)
            arrays = [f for f in protocol.transport.frames() if isinstance(f, list)]
            assert arrays, "bursts of several ticks went out as arrays"
            assert all([t["seq"] for t in a] == sorted(t["seq"] for t in a) for a in arrays)
            assert protocol.transport.seqs() == list(range(1, 110))


class SocketProtocol(asyncio.Protocol):
    """The server end of a real loopback connection, as SocketFrameWriter sees uvicorn's protocol:
    its transport pauses at the high-water mark and calls `pause_writing`."""

    def __init__(self, *, hooks: bool = True) -> None:
        self.close_sent = False
        self.disconnected = False
        self.hooks = hooks  # False: closes reach the hub only through its lane sweep
        self.writer = SocketFrameWriter(self)  # type: ignore[arg-type]
        self.transport: asyncio.Transport
        self.raw_transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = self.raw_transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=HIGH_WATER_BYTES)

    def pause_writing(self) -> None:
        self.writer.blocked()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disconnected = True
        if self.hooks:
            self.writer.blocked()


@contextlib.asynccontextmanager
async def socket_pair(
    *, hooks: bool = True, buffers: int | None = None
) -> AsyncIterator[tuple[SocketProtocol, socket.socket]]:
    """A SocketProtocol and the client socket at the other end (non-blocking). `buffers`:
    small kernel buffers on both ends, so that a client that does not read fills them."""
    loop = asyncio.get_running_loop()
    protocol = SocketProtocol(hooks=hooks)
    server = await loop.create_server(lambda: protocol, "127.0.0.1", 0)
    client = socket.socket()
    if buffers:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffers)
    client.setblocking(False)
    await loop.sock_connect(client, server.sockets[0].getsockname())
    while not hasattr(protocol, "transport"):
        await asyncio.sleep(0.001)
    if buffers:
        sock = protocol.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffers)
    try:
        yield protocol, client
    finally:
        client.close()
        protocol.transport.abort()
        server.close()
        await server.wait_closed()


async def read_available(client: socket.socket, quiet: float = 0.3) -> bytes:
    """What the client can read until nothing more comes for `quiet` seconds."""
    loop = asyncio.get_running_loop()
    chunks = []
    while True:
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(client, 65536), quiet)
        except TimeoutError:
            return b"".join(chunks)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def socket_subscriber(
    hub: FanoutHub, publish: Callable[..., Any], protocol: SocketProtocol, **outbox_kw: Any
) -> Outbox:
    """An outbox written to `protocol`'s connection, subscribed to AAPL after its first tick."""
    outbox = direct_outbox(protocol, **outbox_kw)  # type: ignore[arg-type]
    await publish("AAPL", [1])
    await hub.attach(outbox, "AAPL", since=None)
    return outbox


@pytest.mark.skipif(not DIRECT_WRITES_AVAILABLE, reason="app/prices/_fanout.c was not built")
@pytest.mark.both_loops
class TestDirectLanes:
    """Lane members the hub send()s to itself, over real sockets: the bytes a client reads
    must be whole frames, every seq once and in order, whatever the socket does. On both
    loops: production runs uvloop, whose transports buffer differently from asyncio's."""

    async def test_an_up_to_date_subscriber_is_sent_every_tick_once_in_order(self) -> None:
        async with running_hub("AAPL") as (hub, publish), socket_pair() as (protocol, client):
            outbox = await socket_subscriber(hub, publish, protocol)
            await publish("AAPL", range(2, 300))
            assert outbox.lane is not None and outbox.lane.is_direct(outbox)
            assert tick_seqs(parse_frames(await read_available(client))) == list(range(1, 300))

    async def test_a_full_socket_hands_the_rest_to_the_transport_in_order(self) -> None:
        async with (
            running_hub("AAPL") as (hub, publish),
            socket_pair(buffers=4096) as (protocol, client),
        ):
            outbox = await socket_subscriber(hub, publish, protocol, limit=5000)
            await publish("AAPL", [2])
            assert outbox.lane is not None and outbox.lane.is_direct(outbox)
            # The client reads nothing: the socket fills, a send is cut short or refused, the
            # transport buffers the rest and pauses at its high-water mark, ticks queue.
            for start in range(3, 3000, 50):
                await publish("AAPL", range(start, min(start + 50, 3000)), burst=50)
                # Bytes the transport holds must go before any later send of the hub's.
                if protocol.transport.get_write_buffer_size():
                    assert outbox.lane is None or not outbox.lane.is_direct(outbox)
            assert outbox.lane is None
            assert protocol.transport.get_write_buffer_size() > 0
            queued = [f.seq for f in outbox.drain()]
            written = tick_seqs(parse_frames(await read_available(client)))
            assert written + queued == list(range(1, 3000)), "no gap, no duplicate, in order"

    async def test_a_member_that_fell_back_is_sent_to_directly_again_once_drained(self) -> None:
        async with (
            running_hub("AAPL") as (hub, publish),
            socket_pair(buffers=4096) as (protocol, client),
        ):
            outbox = await socket_subscriber(hub, publish, protocol, limit=5000)
            seq = 1
            # The client reads nothing: a send is cut short, the transport takes the rest,
            # and the member rejoins its lane while the transport still holds bytes, so it is
            # written through the transport.
            while outbox.lane is None or outbox.lane.is_direct(outbox):
                seq += 1
                await publish("AAPL", [seq])
                assert seq < 2000, "the socket never filled"
            assert protocol.transport.get_write_buffer_size() > 0
            # The client catches up, with room enough from now on.
            protocol.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20
            )
            received = await read_available(client)
            assert protocol.transport.get_write_buffer_size() == 0
            outbox.lane.sweep_at = 0.0  # the once-a-second sweep, now
            await publish("AAPL", range(seq + 1, seq + 20))
            assert outbox.lane is not None and outbox.lane.is_direct(outbox)
            received += await read_available(client)
            assert tick_seqs(parse_frames(received)) == list(range(1, seq + 20))

    async def test_a_connection_off_the_lane_holds_no_descriptor(self) -> None:
        async with running_hub("AAPL") as (hub, publish), socket_pair() as (protocol, client):
            before = open_fds()
            outbox = await socket_subscriber(hub, publish, protocol)
            await publish("AAPL", [2, 3])
            assert outbox.lane is not None and outbox.lane.is_direct(outbox)
            assert open_fds() == before + 1 and hub.direct_held == 1
            hub.detach(outbox, ["AAPL"])
            assert outbox.lane is None and open_fds() == before and hub.direct_held == 0

    async def test_a_connection_closed_behind_the_hubs_back_is_swept_and_closes(self) -> None:
        async with (
            running_hub("AAPL") as (hub, publish),
            socket_pair(hooks=False) as (protocol, client),
        ):
            outbox = await socket_subscriber(hub, publish, protocol)
            await publish("AAPL", [2, 3])
            lane = outbox.lane
            assert lane is not None and lane.is_direct(outbox)
            await read_available(client)
            protocol.raw_transport.close()  # no protocol hook tells the hub
            lane.sweep_at = 0.0
            await publish("AAPL", [4])
            assert outbox.lane is None
            assert await read_available(client) == b"", "the client sees the close: no tick 4"

    def test_direct_sends_take_only_descriptors_no_connection_may_need(self) -> None:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert direct_limit(max_connections=soft) == 0
        assert direct_limit(max_connections=0) == max(0, soft - 1024)  # the reserve
        assert direct_limit(max_connections=100) == max(0, soft - 1124)

    @pytest.mark.parametrize("why", ["FANOUT_DIRECT_WRITES=false", "no descriptors to spare"])
    async def test_a_member_not_sent_to_directly_is_written_through_its_transport(
        self, why: str
    ) -> None:
        direct_writes = why != "FANOUT_DIRECT_WRITES=false"
        async with (
            running_hub("AAPL", direct_writes=direct_writes) as (hub, publish),
            socket_pair() as (protocol, client),
        ):
            if why == "no descriptors to spare":
                hub.direct_limit = 0  # as if half the open-file limit were held already
            outbox = await socket_subscriber(hub, publish, protocol)
            await publish("AAPL", range(2, 50))
            assert outbox.lane is not None and not outbox.lane.is_direct(outbox)
            assert tick_seqs(parse_frames(await read_available(client))) == list(range(1, 50))


class TestWatchedTransport:
    """What uvicorn writes must take a connection off the hub's direct sends first when it
    could be overtaken (bytes left buffered) or followed (a close)."""

    class Inner:
        def __init__(self, buffered: int = 0) -> None:
            self.buffered = buffered
            self.calls: list[str] = []

        def write(self, data: bytes) -> None:
            self.calls.append("write")

        def get_write_buffer_size(self) -> int:
            return self.buffered

        def close(self) -> None:
            self.calls.append("close")

        def abort(self) -> None:
            self.calls.append("abort")

        def write_eof(self) -> None:
            self.calls.append("write_eof")

    def watched(self, inner: Inner, log: list[str]) -> WatchedTransport:
        return WatchedTransport(inner, lambda: log.append("left"))  # type: ignore[arg-type]

    def test_a_write_that_went_out_whole_keeps_the_fast_path(self) -> None:
        log: list[str] = []
        self.watched(self.Inner(buffered=0), log).write(b"ping")
        assert log == []

    def test_a_write_that_left_bytes_buffered_leaves_it(self) -> None:
        log: list[str] = []
        self.watched(self.Inner(buffered=10), log).write(b"pong")
        assert log == ["left"]

    @pytest.mark.parametrize("method", ["close", "abort", "write_eof"])
    def test_a_close_leaves_it_before_the_transport_closes(self, method: str) -> None:
        log: list[str] = []
        inner = self.Inner()
        transport = self.watched(inner, log)
        inner.calls = log  # one log: the order of the two
        getattr(transport, method)()
        assert log == ["left", method]
