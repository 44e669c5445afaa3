"""Resumes that read the database, and the `reset` snapshot: where ticks are stored nowhere
(neither the window nor the database), or a seq went back, a stream says so with a snapshot
marked `"reset": true` rather than a silent jump. Through a hub on an in-memory broker, with
the window in memory and the database on SQLite; a real server's turn is in
tests/history/test_resume_server.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from sqlalchemy import text

from app.db import create_engine, create_session_factory
from app.history.models import TickRecord
from app.history.reads import Sessions
from app.history.service import History
from app.prices.outbox import Outbox
from app.prices.store import MemoryTickStore
from app.prices.ticks import Tick
from tests.prices.fanout_support import (
    FakeProtocol,
    consuming_hub,
    direct_outbox,
    tick,
)

BASE_TS = 1_764_300_000_000


@pytest.fixture
async def sessions(database_url: str) -> AsyncIterator[Sessions]:
    engine = create_engine(database_url)
    try:
        yield create_session_factory(engine)
    finally:
        await engine.dispose()


async def stored_in_db(sessions: Sessions, ticks: list[Tick]) -> None:
    async with sessions() as session:
        session.add_all(
            TickRecord(symbol=t.symbol, seq=t.seq, ts=t.ts, frame=t.frame) for t in ticks
        )
        await session.commit()


def seen(frames: list[Any]) -> list[tuple[str, int]]:
    """(kind, seq) of each price frame: `reset` for a snapshot marked reset."""
    out = []
    for frame in frames:
        body = orjson.loads(frame.text) if not isinstance(frame, dict) else frame
        kind = "reset" if body.get("reset") is True else body["type"]
        assert body.get("reset") in (None, True), body
        out.append((kind, body["seq"]))
    return out


async def until(outbox: Outbox, last: int) -> list[tuple[str, int]]:
    """What `outbox` queues, polled until a frame of seq `last` (or 3 s)."""
    got: list[tuple[str, int]] = []
    for _ in range(300):
        got += seen([f for f in outbox.drain() if f.event != "control"])
        if got and got[-1][1] == last:
            break
        await asyncio.sleep(0.01)
    return got


def new_store() -> MemoryTickStore:
    return MemoryTickStore(retention=1000, candles_kept=10)


class TestLiveGaps:
    async def test_a_gap_stored_nowhere_is_a_reset(self) -> None:
        outbox = Outbox(limit=64, on_queued=lambda: None)
        async with consuming_hub("MSFT", attach_first=[outbox]) as fanout:
            await fanout.produce("MSFT", range(1, 4))
            await fanout.produce("MSFT", range(7, 9))  # 4..6 were never stored anywhere
            got = await until(outbox, 8)

        assert got == [("snapshot", 1), ("tick", 2), ("tick", 3), ("reset", 7), ("tick", 8)]

    async def test_a_gap_the_database_holds_is_filled_without_a_reset(
        self, sessions: Sessions
    ) -> None:
        """Redis restarted empty: 2..20 are in the database only."""
        store = new_store()
        history = History(store=store, sessions=sessions, retention=1000)
        outbox = Outbox(limit=64, on_queued=lambda: None)
        await stored_in_db(sessions, [tick("MSFT", seq) for seq in range(1, 21)])
        async with consuming_hub(
            "MSFT", store=store, history=history, attach_first=[outbox]
        ) as fanout:
            await fanout.broker.publish("prices:MSFT", tick("MSFT", 1).frame)
            await fanout.produce("MSFT", [21])
            got = await until(outbox, 21)

        assert got == [("snapshot", 1)] + [("tick", seq) for seq in range(2, 22)]

    async def test_a_seq_that_went_back_is_a_reset(self) -> None:
        """The store lost everything and the producer began again at 1, later in time."""
        outbox = Outbox(limit=64, on_queued=lambda: None)
        async with consuming_hub("MSFT", attach_first=[outbox]) as fanout:
            for seq in range(1, 6):  # published; the store that held them is gone
                await fanout.broker.publish("prices:MSFT", tick("MSFT", seq).frame)
            await until(outbox, 5)
            await fanout.send(*(tick("MSFT", seq, ts=BASE_TS + 100 + seq) for seq in (1, 2)))
            got = await until(outbox, 2)

        assert got == [("reset", 1), ("tick", 2)]
        assert fanout.hub.sequencer.last_seq["MSFT"] == 2

    async def test_a_redelivered_tick_is_no_reset(self) -> None:
        outbox = Outbox(limit=64, on_queued=lambda: None)
        async with consuming_hub("MSFT", attach_first=[outbox]) as fanout:
            await fanout.produce("MSFT", range(1, 4))
            await fanout.broker.publish("prices:MSFT", tick("MSFT", 2).frame)  # again
            await fanout.produce("MSFT", [4])
            got = await until(outbox, 4)

        assert got == [("snapshot", 1), ("tick", 2), ("tick", 3), ("tick", 4)]

    async def test_a_connection_on_its_lane_gets_the_reset_too(self) -> None:
        protocol = FakeProtocol()
        async with consuming_hub("MSFT") as fanout:
            await fanout.publish("MSFT", [1])
            outbox = direct_outbox(protocol)
            await fanout.hub.attach(outbox, "MSFT", since=None, subject="tester")
            await fanout.publish("MSFT", [2, 3])
            assert outbox.lane is not None, "up to date: on the fast path"
            await fanout.publish("MSFT", [9, 10, 11])  # 4..8 stored nowhere
            for _ in range(100):
                if (
                    protocol.transport.frames()[-1:]
                    and protocol.transport.frames()[-1]["seq"] == 11
                ):
                    break
                await asyncio.sleep(0.01)

        assert seen(protocol.transport.frames()) == [
            ("snapshot", 1),
            ("tick", 2),
            ("tick", 3),
            ("reset", 9),
            ("tick", 10),
            ("tick", 11),
        ]


class TestResume:
    async def test_a_resume_beyond_the_window_reads_the_database(self, sessions: Sessions) -> None:
        store = new_store()
        history = History(store=store, sessions=sessions, retention=1000)
        await stored_in_db(sessions, [tick("MSFT", seq) for seq in range(1, 21)])
        for seq in range(21, 26):  # the window, after Redis restarted empty
            await store.append(tick("MSFT", seq), {}, fence=None)
        outbox = Outbox(limit=64, on_queued=lambda: None)
        async with consuming_hub("MSFT", store=store, history=history) as fanout:
            await fanout.hub.attach(outbox, "MSFT", since=5, subject="tester")
            got = await until(outbox, 25)

        assert got == [("tick", seq) for seq in range(6, 26)]

    async def test_a_resume_over_ticks_stored_nowhere_gets_a_reset(
        self, sessions: Sessions
    ) -> None:
        store = new_store()
        history = History(store=store, sessions=sessions, retention=1000)
        await stored_in_db(sessions, [tick("MSFT", seq) for seq in range(1, 11)])
        for seq in range(21, 26):  # 11..20: in neither
            await store.append(tick("MSFT", seq), {}, fence=None)
        outbox = Outbox(limit=64, on_queued=lambda: None)
        nothing_stored = Outbox(limit=64, on_queued=lambda: None)
        async with consuming_hub("MSFT", store=store, history=history) as fanout:
            await fanout.hub.attach(outbox, "MSFT", since=5, subject="tester")
            await fanout.hub.attach(nothing_stored, "MSFT", since=12, subject="tester")
            got = await until(outbox, 25)
            from_twelve = await until(nothing_stored, 25)

        assert got == [("tick", seq) for seq in range(6, 11)] + [("reset", 21)] + [
            ("tick", seq) for seq in range(22, 26)
        ]
        assert from_twelve == [("reset", 21)] + [("tick", seq) for seq in range(22, 26)]

    async def test_a_resume_ahead_of_the_feed_gets_a_reset(self) -> None:
        """The client's seq is one this feed never reached: the seq restarted below it."""
        store = new_store()
        for seq in range(1, 4):
            await store.append(tick("MSFT", seq), {}, fence=None)
        outbox = Outbox(limit=64, on_queued=lambda: None)
        async with consuming_hub("MSFT", store=store) as fanout:
            await fanout.hub.attach(outbox, "MSFT", since=1_000, subject="tester")
            await fanout.produce("MSFT", [4])
            got = await until(outbox, 4)

        assert got == [("reset", 3), ("tick", 4)]

    @pytest.mark.parametrize(
        ("since", "first"), [(1_000, "reset"), (3, "reset"), (1, "tick"), (0, "tick")]
    )
    async def test_a_resume_before_the_feed_ticked_is_answered_by_its_first_tick(
        self, since: int, first: str
    ) -> None:
        """Nothing stored yet (a fresh feed, or Redis restarted empty and nothing published
        since): the stream waits for the first tick and sends it as a tick after the client's
        seq, or as a reset snapshot at or below it, instead of staying silent until the feed
        passes the client's seq."""
        outbox = Outbox(limit=64, on_queued=lambda: None)
        async with consuming_hub("MSFT") as fanout:
            await fanout.hub.attach(outbox, "MSFT", since=since, subject="tester")
            await fanout.produce("MSFT", [3, 4])
            got = await until(outbox, 4)

        assert got == [(first, 3), ("tick", 4)]

    async def test_without_the_database_a_resume_replays_the_window_with_a_plain_jump(
        self, sessions: Sessions
    ) -> None:
        """Unknown is not lost: the ticks may be readable later, so no reset."""
        store = new_store()
        history = History(store=store, sessions=sessions, retention=1000)
        for seq in range(21, 26):
            await store.append(tick("MSFT", seq), {}, fence=None)
        async with sessions() as session:  # every tick query fails from now on
            await session.execute(text("DROP TABLE ticks"))
            await session.commit()
        outbox = Outbox(limit=64, on_queued=lambda: None)
        async with consuming_hub("MSFT", store=store, history=history) as fanout:
            await fanout.hub.attach(outbox, "MSFT", since=5, subject="tester")
            got = await until(outbox, 25)

        assert got == [("tick", seq) for seq in range(21, 26)]
