"""History with real servers: the database taken away mid-stream costs subscribers nothing
(/readyz says `history: degraded`, the metrics move, history catches up); and with Redis and
the leader SIGKILLed together, the instance that takes over goes on from the last published
seq, no jump, and history holds every tick."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.feed.test_ingest_cluster import Collector, producer_pid, two_instances
from tests.support import (
    LiveApp,
    RedisServer,
    open_stream,
    running,
    server_process,
    sqlite_locked,
    token,
)


def history_seqs(database_url: str, symbol: str) -> list[int]:
    path = database_url.split("///", 1)[1]
    with sqlite3.connect(path, timeout=10) as conn:
        rows = conn.execute("SELECT seq FROM ticks WHERE symbol = ? ORDER BY seq", (symbol,))
        return [int(r[0]) for r in rows]


async def readiness(base: str) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{base}/readyz", timeout=10)
        return response.status_code, response.json()


async def metric(base: str, name: str) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{base}/metrics", timeout=10)).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not exported")


async def eventually(check: Callable[[], Any], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.1)


def assert_contiguous(seqs: list[int]) -> None:
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a seq gap or repeat"


class TestDatabaseDownMidStream:
    async def test_subscribers_miss_nothing_and_history_catches_up(
        self, live: Callable[..., AbstractAsyncContextManager[LiveApp]], database_url: str
    ) -> None:
        async with (
            live(feed_ticks_per_second=50, fanout_max_lag_ms=60_000) as server,
            open_stream(f"{server.ws}/v1/ws/prices/AAPL?since=0&token={token()}") as stream,
        ):
            watcher = Collector(stream)
            await eventually(lambda: _more_than(watcher, 10))
            assert (await readiness(server.http))[1]["checks"]["history"] == "ok"

            # Another process's lock: every write refused.
            async with sqlite_locked(database_url.split("///", 1)[1]):
                seen_at_outage = len(watcher.ticks)

                async def degraded() -> bool:
                    status, body = await readiness(server.http)
                    assert status == 200, body
                    return bool(body["checks"]["history"] == "degraded")

                await eventually(degraded)
                assert await metric(server.http, "pricefeed_history_write_lag_seconds") > 0
                await eventually(lambda: _more_than(watcher, seen_at_outage + 100))

            async def healthy() -> bool:
                return bool((await readiness(server.http))[1]["checks"]["history"] == "ok")

            await eventually(healthy)
            seen = [t["seq"] for t in await watcher.stop()]
            await eventually(lambda: _written_through(database_url, seen[-1]))
            assert await metric(server.http, "pricefeed_history_dropped_total") == 0
        assert_contiguous(seen)
        stored = history_seqs(database_url, "AAPL")
        assert set(seen) <= set(stored), "every tick a subscriber got is in history"
        assert_contiguous(stored)


async def _more_than(watcher: Collector, count: int) -> bool:
    return len(watcher.ticks) > count


async def _written_through(database_url: str, seq: int) -> bool:
    stored = await asyncio.to_thread(history_seqs, database_url, "AAPL")
    return bool(stored) and stored[-1] >= seq


@pytest.mark.redis
@pytest.mark.slow
class TestRedisAndLeaderLostTogether:
    async def test_the_new_leader_goes_on_from_the_last_published_seq(
        self, redis: RedisServer, database_url: str, tmp_path: Path
    ) -> None:
        # No skipping of stale ticks by a hub that falls behind on a busy machine: a jump
        # that would not be the one this test looks for.
        env = {"BROADCAST_URL": redis.url, "FANOUT_MAX_LAG_MS": "60000"}
        a = server_process(tmp_path, "a", database_url, **env)
        b = server_process(tmp_path, "b", database_url, **env)
        with running(a, b):
            leader, survivor = await two_instances(a, b)
            url = f"{survivor.ws}/v1/ws/prices/AAPL?since=0&token={token('watcher')}"
            async with open_stream(url) as stream:
                watcher = Collector(stream)
                await eventually(lambda: _more_than(watcher, 30))
                # Together: Redis (no persistence) and the leader, its producer included.
                redis.kill()
                os.kill(producer_pid(leader), signal.SIGKILL)
                leader.stop(signal.SIGKILL)
                before = watcher.ticks[-1]["seq"]
                redis.start()
                await eventually(lambda: _past(watcher, before + 20), timeout=60)
                seen = [t["seq"] for t in await watcher.stop()]
            await eventually(lambda: _written_through(database_url, seen[-1]))
        after = seen[seen.index(before) + 1]
        assert after == before + 1, f"the new leader's first seq after {before} was {after}"
        assert_contiguous(seen)
        stored = history_seqs(database_url, "AAPL")
        assert stored == list(range(1, stored[-1] + 1)), "history holds every tick, no hole"


async def _past(watcher: Collector, seq: int) -> bool:
    return bool(watcher.ticks) and watcher.ticks[-1]["seq"] > seq
