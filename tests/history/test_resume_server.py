"""Resumes after Redis lost everything, on a real server (`python -m app`, its producer a child
process) and a real redis-server, SIGKILLed and restarted empty. FEED_SOURCE=ingest: only
pushed quotes tick, so the series is known. The ticks the history writer would have stored are
copied into the database by the test itself (idempotently, as the writer writes), so what is
proven here is the read side: with the database holding them, a resume gets every later tick
and no jump; without, a `reset` snapshot instead of a silent one."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from redis.asyncio import Redis

from app.db import create_engine
from app.history.records import HistoryRecords
from app.prices.store import RedisTickStore
from app.prices.ticks import Tick, encode_tick
from tests.prices.test_sse import open_events
from tests.support import RedisServer, ServerProcess, Stream, open_stream, running, server_process
from tests.support import token as make_token

pytestmark = [pytest.mark.redis, pytest.mark.slow]

READER = {"Authorization": f"Bearer {make_token('reader', ttl=600)}"}
FEEDER = {"Authorization": f"Bearer {make_token('feeder', scopes=('publish',), ttl=600)}"}


async def push(http: httpx.AsyncClient, count: int, *, first: int) -> None:
    """`count` AAPL quotes, each one tick."""
    quotes = [{"symbol": "AAPL", "price": f"{100 + first + i}.25"} for i in range(count)]
    response = await http.post("/v1/ingest", json={"quotes": quotes}, headers=FEEDER)
    assert response.status_code == 202, response.text


async def latest_seq_reaches(http: httpx.AsyncClient, seq: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            response = await http.get("/v1/prices/AAPL", headers=READER)
            if response.status_code == 200 and response.json()["seq"] >= seq:
                assert response.json()["seq"] == seq, "only pushed quotes tick"
                return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"AAPL did not reach seq {seq}")


async def leads_again(server: ServerProcess, timeout: float = 30) -> None:
    """Ready, and its producer leads (it stood by while Redis was gone)."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                response = await http.get(f"{server.http}/readyz", timeout=2)
                if (
                    response.status_code == 200
                    and response.json()["checks"].get("producer") == "leader"
                ):
                    return
            await asyncio.sleep(0.1)
    raise TimeoutError("the producer did not lead again")


async def copy_window_to_database(http: httpx.AsyncClient, database_url: str) -> list[int]:
    """What the history writer does, as it does it (a tick kept already stays): every
    published tick into the table, as published. The writer itself may be writing the same
    ticks meanwhile, so no read-then-insert (a merge) that it could come between."""
    response = await http.get(
        "/v1/prices/AAPL/history", params={"since": 0, "limit": 1000}, headers=READER
    )
    ticks = response.json()
    engine = create_engine(database_url)
    try:
        await HistoryRecords(engine).write(
            [
                Tick(symbol="AAPL", seq=t["seq"], ts=t["ts"], frame=orjson.dumps(t).decode())
                for t in ticks
            ],
            {},
        )
    finally:
        await engine.dispose()
    return [t["seq"] for t in ticks]


@contextlib.asynccontextmanager
async def server_with_redis(
    tmp_path: Path, redis: RedisServer, database_url: str, *, writer: bool = True
) -> AsyncIterator[tuple[ServerProcess, httpx.AsyncClient]]:
    """`writer=False`: HISTORY_DAYS=0, no history writer, so what the test does not copy into
    the database is stored nowhere once Redis lost it."""
    env = {"BROADCAST_URL": redis.url, "FEED_SOURCE": "ingest"}
    if not writer:
        env["HISTORY_DAYS"] = "0"
    server = server_process(tmp_path, "solo", database_url, **env)
    with running(server):
        await server.wait_ready()
        await leads_again(server)
        async with httpx.AsyncClient(base_url=server.http, timeout=10) as http:
            yield server, http


async def restart_redis_empty(redis: RedisServer, server: ServerProcess) -> None:
    redis.kill()  # SIGKILL: nothing saved, and no persistence configured
    redis.start()
    await leads_again(server)


async def frames_until(stream: Stream, seq: int) -> list[dict[str, Any]]:
    """Price frames up to the one of seq `seq`."""
    got: list[dict[str, Any]] = []
    while not got or got[-1]["seq"] != seq:
        frame = await stream.recv_type("tick", "snapshot", timeout=10)
        got.append(frame)
    return got


def kinds(frames: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [("reset" if f.get("reset") else f["type"], f["seq"]) for f in frames]


class TestRedisRestartedEmpty:
    async def test_a_resume_gets_every_later_tick_from_the_database(
        self, redis: RedisServer, database_url: str, tmp_path: Path
    ) -> None:
        async with server_with_redis(tmp_path, redis, database_url) as (server, http):
            await push(http, 30, first=0)
            await latest_seq_reaches(http, 30)
            assert await copy_window_to_database(http, database_url) == list(range(1, 31))
            await restart_redis_empty(redis, server)
            await push(http, 5, first=30)
            await latest_seq_reaches(http, 35)  # the producer's seq went on
            window = await http.get(
                "/v1/prices/AAPL/history", params={"limit": 100}, headers=READER
            )
            assert [t["seq"] for t in window.json()][:1] == [1], "the newest, from both"

            token = make_token("resumer", ttl=600)
            async with open_stream(f"{server.ws}/v1/ws/prices/AAPL?since=12&token={token}") as one:
                one_symbol = await frames_until(one, 35)
                await push(http, 1, first=35)
                live = await one.recv_type("tick", "snapshot", timeout=10)
            async with open_stream(f"{server.ws}/v1/ws?token={token}") as many:
                await many.send({"op": "subscribe", "symbols": ["AAPL"], "since": {"AAPL": 30}})
                multiplexed = await frames_until(many, 36)
            events = []
            headers = {"Last-Event-ID": "AAPL:20"}
            async with open_events(http, {"symbols": "AAPL", "token": token}, headers) as reader:
                while not events or events[-1].seq != 36:
                    events.append(await reader.next())

        assert kinds(one_symbol) == [("tick", seq) for seq in range(13, 36)]
        assert one_symbol[0]["price"] == "112.2500", "tick 13 as it was published"
        assert kinds([live]) == [("tick", 36)]
        assert kinds(multiplexed) == [("tick", seq) for seq in range(31, 37)]
        assert [(e.event, e.seq) for e in events] == [("tick", seq) for seq in range(21, 37)]

    async def test_a_resume_over_ticks_stored_nowhere_gets_a_reset(
        self, redis: RedisServer, database_url: str, tmp_path: Path
    ) -> None:
        async with server_with_redis(tmp_path, redis, database_url, writer=False) as (
            server,
            http,
        ):
            await push(http, 30, first=0)
            await latest_seq_reaches(http, 30)
            await restart_redis_empty(redis, server)  # nothing was written to the database
            await push(http, 5, first=30)
            await latest_seq_reaches(http, 35)

            token = make_token("resumer", ttl=600)
            async with open_stream(f"{server.ws}/v1/ws/prices/AAPL?since=12&token={token}") as one:
                got = await frames_until(one, 35)

        assert kinds(got) == [("reset", 31)] + [("tick", seq) for seq in range(32, 36)]
        assert got[0]["type"] == "snapshot" and got[0]["reset"] is True
        assert got[0]["price"] == "130.2500", "tick 31 as it was published"


class TestResets:
    async def test_a_resume_ahead_of_the_feed_gets_a_reset_on_every_route(
        self, redis: RedisServer, database_url: str, tmp_path: Path
    ) -> None:
        """A client's seq this feed never reached (its seq restarted below it)."""
        async with server_with_redis(tmp_path, redis, database_url) as (server, http):
            await push(http, 3, first=0)
            await latest_seq_reaches(http, 3)
            token = make_token("resumer", ttl=600)
            async with open_stream(f"{server.ws}/v1/ws/prices/AAPL?since=999&token={token}") as one:
                one_symbol = await one.recv_type("tick", "snapshot")
            async with open_stream(f"{server.ws}/v1/ws?token={token}") as many:
                await many.send({"op": "subscribe", "symbols": ["AAPL"], "since": {"AAPL": 999}})
                multiplexed = await many.recv_type("tick", "snapshot")
            headers = {"Last-Event-ID": "AAPL:999"}
            async with open_events(http, {"symbols": "AAPL", "token": token}, headers) as reader:
                sse = await reader.next()

        for frame in (one_symbol, multiplexed, sse.data):
            assert (frame["type"], frame["reset"], frame["seq"]) == ("snapshot", True, 3)
        assert sse.event == "snapshot"

    async def test_a_live_gap_stored_nowhere_is_a_reset(
        self, redis: RedisServer, database_url: str, tmp_path: Path
    ) -> None:
        """A tick reaches the broker after seqs that neither the store nor the database has
        (published, never stored): subscribers get it as a reset."""
        async with server_with_redis(tmp_path, redis, database_url, writer=False) as (
            server,
            http,
        ):
            await push(http, 3, first=0)
            await latest_seq_reaches(http, 3)
            token = make_token("watcher", ttl=600)
            async with open_stream(f"{server.ws}/v1/ws/prices/AAPL?token={token}") as stream:
                snapshot = await stream.recv_type("snapshot")
                stray = {
                    "type": "tick",
                    "symbol": "AAPL",
                    "price": "150.25",
                    "ts": time.time_ns() // 1_000_000,
                    "seq": 7,
                }
                client = Redis.from_url(redis.url)
                try:
                    await client.publish("prices:AAPL", orjson.dumps(stray))
                finally:
                    await client.aclose()
                reset = await stream.recv_type("tick", "snapshot", timeout=10)

        assert kinds([snapshot]) == [("snapshot", 3)]
        assert reset == {**stray, "type": "snapshot", "reset": True}

    async def test_a_seq_that_goes_back_live_is_a_reset(
        self, redis: RedisServer, database_url: str, tmp_path: Path
    ) -> None:
        """The test is the producer (PRODUCER=off): ticks 1..5 stored, then published; then
        Redis loses everything and the producer starts again at seq 1, later in time. A
        subscriber gets tick 1 as a reset, not a silence until seq passes 5 again."""
        server = server_process(
            tmp_path,
            "solo",
            database_url,
            BROADCAST_URL=redis.url,
            PRODUCER="off",
            HISTORY_DAYS="0",
        )
        client = Redis.from_url(redis.url)
        store = RedisTickStore(client, prefix="pricefeed", retention=1000, candles_kept=10)
        start = time.time_ns() // 1_000_000

        async def produce(seq: int, ts: int) -> None:
            tick = encode_tick(symbol="AAPL", price=Decimal(100 + seq), ts=ts, seq=seq)
            await store.append(tick, {}, fence=None)  # the store first, as the producer does
            await client.publish("prices:AAPL", tick.frame)

        try:
            with running(server):
                await server.wait_ready()
                async with httpx.AsyncClient(base_url=server.http, timeout=10) as http:
                    for seq in range(1, 6):
                        await produce(seq, start + seq)
                    await latest_seq_reaches(http, 5)
                token = make_token("watcher", ttl=600)
                async with open_stream(f"{server.ws}/v1/ws/prices/AAPL?token={token}") as stream:
                    snapshot = await stream.recv_type("snapshot")
                    await client.flushall()  # Redis lost everything
                    await produce(1, start + 100)
                    await produce(2, start + 101)
                    after = [await stream.recv_type("tick", "snapshot", timeout=10) for _ in "12"]
        finally:
            await client.aclose()

        assert kinds([snapshot]) == [("snapshot", 5)]
        assert kinds(after) == [("reset", 1), ("tick", 2)]
        assert after[0]["ts"] == start + 100
