"""Slow and stuck readers against a real server: bounded memory, conflation a client can see,
1013 for a reader stuck too long, and no harm to fast readers on the same instance."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from app.errors import CloseCode
from app.prices import lanes as lanes_module
from app.prices.lanes import DIRECT_WRITES_AVAILABLE, direct_limit
from app.prices.streams import WebSocketStream
from tests.support import FAST_VARIANTS, SEED_SYMBOLS, LiveApp, Stream, open_stream, token

SYMBOLS = SEED_SYMBOLS
SUBSCRIBE_ALL = {"op": "subscribe", "symbols": SYMBOLS}


@contextlib.asynccontextmanager
async def reluctant_reader(server: LiveApp, subject: str) -> AsyncIterator[Stream]:
    """A client with a tiny receive buffer that reads only when the test says so."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    sock.setblocking(False)
    conn = await connect(f"{server.ws}/v1/ws?token={token(subject)}", sock=sock, max_queue=1)
    try:
        yield Stream(conn)
    finally:
        conn.transport.abort()  # its close handshake would wait behind the unread frames
        await conn.wait_closed()


def seqs_by_symbol(frames: list[dict[str, Any]]) -> dict[str, list[int]]:
    by_symbol: dict[str, list[int]] = {}
    for frame in frames:
        if frame.get("type") in ("tick", "snapshot"):
            by_symbol.setdefault(frame["symbol"], []).append(frame["seq"])
    for symbol, seqs in by_symbol.items():
        assert seqs == sorted(set(seqs)), f"{symbol} out of order or duplicated"
    return by_symbol


def jumps(by_symbol: dict[str, list[int]]) -> int:
    return sum(1 for s in by_symbol.values() for a, b in zip(s, s[1:], strict=False) if b > a + 1)


def stream_of(server: LiveApp, subject: str) -> WebSocketStream | None:
    for stream in server.app.state.streams:
        if isinstance(stream, WebSocketStream) and stream.principal.subject == subject:
            return stream
    return None


@pytest.mark.both_loops
# Not on uvicorn's stock protocol: its close waits for the socket to drain first, so a reader
# that reads nothing is not closed until it reads (pricefeed's protocol queues the close frame
# behind what is buffered and aborts the connection if it is not taken within the timeout).
@FAST_VARIANTS
@pytest.mark.parametrize(
    "symbols",
    [SYMBOLS, SYMBOLS[:1]],
    # A watchlist goes through the per-connection path; one symbol through the hub's lanes.
    ids=["watchlist", "one-symbol"],
)
async def test_stuck_reader_is_bounded_then_closed_1013_while_fast_reader_keeps_every_tick(
    live, symbols: list[str], fanout_direct_writes: bool
) -> None:
    subscribe = {"op": "subscribe", "symbols": symbols}
    async with live(
        feed_ticks_per_second=400,
        ws_outbox_frames=64,
        ws_send_timeout_seconds=1.5,
        ws_send_buffer_bytes=8192,
        ws_max_connections=100,
    ) as server:
        async with (
            reluctant_reader(server, "stuck") as stuck,
            open_stream(f"{server.ws}/v1/ws?token={token('fast')}") as fast,
        ):
            await stuck.send(subscribe)
            await fast.send(subscribe)
            fast_frames: list[dict[str, Any]] = []
            largest_outbox = conflated = 0
            stuck_closed_at = None
            fast_in_lane = stuck_in_lane = fast_direct = stuck_direct = False
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                fast_frames.append(await fast.recv())
                fast_stream = stream_of(server, "fast")
                lane = fast_stream.outbox.lane if fast_stream is not None else None
                fast_in_lane |= lane is not None
                fast_direct |= (
                    fast_stream is not None
                    and lane is not None
                    and lane.is_direct(fast_stream.outbox)
                )
                stream = stream_of(server, "stuck")
                lane = stream.outbox.lane if stream is not None else None
                stuck_in_lane |= lane is not None
                stuck_direct |= (
                    stream is not None and lane is not None and lane.is_direct(stream.outbox)
                )
                if stream is not None:
                    largest_outbox = max(largest_outbox, len(stream.outbox))
                    conflated = stream.outbox.conflated
                elif stuck_closed_at is None:
                    stuck_closed_at = time.monotonic()
                    deadline = min(deadline, stuck_closed_at + 1)

            assert stuck_closed_at is not None, "a reader stuck past the send timeout is closed"
            assert largest_outbox <= 64, "the stuck reader's queue stayed bounded"
            assert conflated > 0, "past its bound the queue conflated"
            stuck_frames: list[dict[str, Any]] = []
            with contextlib.suppress(ConnectionClosed):
                while True:
                    stuck_frames.append(await stuck.recv(timeout=5))
            assert stuck.conn.close_code == CloseCode.TRY_LATER
            seqs_by_symbol(stuck_frames)  # what it did get was in order, without duplicates

        # The path under test: one symbol rides the lane until its reader stops keeping up...
        lanes = len(symbols) == 1
        assert fast_in_lane == stuck_in_lane == lanes
        # ...sent to by the hub's C loop (app/prices/_fanout.c) when it was built and direct
        # writes are on, the stuck reader until its socket filled: what it got is checked above
        # (whole frames, in order, then 1013).
        direct = (
            lanes and fanout_direct_writes and DIRECT_WRITES_AVAILABLE and direct_limit(100) > 1
        )
        assert fast_direct == stuck_direct == direct
        fast_seqs = seqs_by_symbol(fast_frames)
        assert set(fast_seqs) == set(symbols)
        for symbol, seqs in fast_seqs.items():
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"{symbol} has a gap"


# Not on uvicorn's stock protocol either: the bounded kernel send buffer (WS_SEND_BUFFER_BYTES)
# is pricefeed's protocol's doing; without it the kernel takes a lagging reader's backlog and
# nothing is conflated.
@FAST_VARIANTS
async def test_slow_reader_is_conflated_not_closed(live) -> None:
    """A reader that lags in bursts but catches up sees seq jumps and stays connected."""
    async with (
        live(
            feed_ticks_per_second=300,
            ws_outbox_frames=32,
            ws_send_timeout_seconds=5,
            ws_send_buffer_bytes=8192,
        ) as server,
        reluctant_reader(server, "slow") as slow,
    ):
        await slow.send(SUBSCRIBE_ALL)
        frames: list[dict[str, Any]] = []
        for _ in range(5):
            await asyncio.sleep(0.5)  # not reading: the server queues, then conflates
            for _ in range(300):
                frames.append(await slow.recv())
        assert jumps(seqs_by_symbol(frames)) > 0
        await slow.send({"op": "ping"})
        assert (await slow.recv_type("pong", timeout=5))["type"] == "pong"


@pytest.mark.both_loops
@pytest.mark.skipif(
    not DIRECT_WRITES_AVAILABLE or direct_limit(100) < 2, reason="no direct sends here"
)
@pytest.mark.parametrize("how", ["close handshake", "bare EOF"])
async def test_a_client_leaving_a_direct_lane_sees_its_connection_closed_at_once(
    live, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The lane's own descriptor must not keep a socket open once the client has gone: the
    protocol takes the connection off the lane as it closes, not the once-a-second sweep
    (turned off here). Only pricefeed's protocol with direct writes on (the `live` default)
    sends to a socket directly."""
    monkeypatch.setattr(lanes_module, "_SWEEP_SECONDS", 3600.0)
    async with live(feed_ticks_per_second=100, ws_max_connections=100) as server:
        async with open_stream(f"{server.ws}/v1/ws?token={token('leaver')}") as client:
            await client.send({"op": "subscribe", "symbols": SYMBOLS[:1]})
            lane = None
            for _ in range(200):
                await client.recv()
                stream = stream_of(server, "leaver")
                lane = stream.outbox.lane if stream is not None else None
                if stream is not None and lane is not None and lane.is_direct(stream.outbox):
                    break
            assert lane is not None, "the stream was sent to directly"
            lanes = lane.owner
            assert lanes.direct_held == 1
            if how == "close handshake":
                await asyncio.wait_for(client.conn.close(), 5)
            else:  # the client's end goes away without a close frame
                client.conn.transport.write_eof()
            # The server's end closes (EOF reaches the client) without waiting for anything.
            await asyncio.wait_for(client.conn.wait_closed(), 5)
            assert lanes.direct_held == 0
