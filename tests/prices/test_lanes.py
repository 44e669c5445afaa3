"""Lanes, the fan-out's fast path: who rides one, what makes one leave, and the bytes a client
reads while it does (every seq once, in order), over fakes and over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest
from prometheus_client import REGISTRY

from app.prices.hub import FanoutHub
from app.prices.lanes import DIRECT_WRITES_AVAILABLE, direct_limit
from app.prices.outbox import Outbox
from tests.prices.fanout_support import (
    FakeProtocol,
    direct_outbox,
    direct_subscriber,
    parse_frames,
    running_hub,
    tick_seqs,
)
from tests.support import FAST_UNAVAILABLE, NEEDS_FAST

if FAST_UNAVAILABLE:
    pytest.skip(NEEDS_FAST.kwargs["reason"], allow_module_level=True)
from app.server.direct_writes import HIGH_WATER_BYTES, SocketFrameWriter  # only once admitted


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
            await hub.attach(
                second, "AAPL", since=None, subject="tester"
            )  # a watchlist: off the fast path
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
            await hub.attach(outbox, "MSFT", since=None, subject="tester")
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
    """The server end of a real loopback connection, as FrameWriter sees uvicorn's protocol:
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
    await hub.attach(outbox, "AAPL", since=None, subject="tester")
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
            assert open_fds() == before + 1 and hub.lanes.direct_held == 1
            hub.detach(outbox, ["AAPL"])
            assert outbox.lane is None and open_fds() == before and hub.lanes.direct_held == 0

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
                hub.lanes.direct_limit = 0  # as if half the open-file limit were held already
            outbox = await socket_subscriber(hub, publish, protocol)
            await publish("AAPL", range(2, 50))
            assert outbox.lane is not None and not outbox.lane.is_direct(outbox)
            assert tick_seqs(parse_frames(await read_available(client))) == list(range(1, 50))
