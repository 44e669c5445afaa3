"""A producer's process stopped gracefully (SIGTERM) leaves no published tick out of history:
the writer's buffer (up to 250 ms of ticks) is written on the way out. Real processes: a
single `python -m app` on memory://, and a `python -m app.feed` beside a server on Redis;
what a subscriber received is compared with what the database holds."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.feed.test_ingest_cluster import Collector
from tests.history.test_history_live import assert_contiguous, eventually, history_seqs
from tests.support import ROOT, RedisServer, open_stream, running, server_process, token

pytestmark = pytest.mark.slow

# Fast enough that the last flush period holds a dozen ticks.
TICKS = {"FEED_TICKS_PER_SECOND": "50", "FANOUT_MAX_LAG_MS": "60000"}


def assert_history_holds(seen: list[int], database_url: str) -> None:
    stored = history_seqs(database_url, "AAPL")
    assert stored, "history holds ticks"
    assert stored[0] == 1
    assert_contiguous(stored)
    missing = sorted(set(seen) - set(stored))
    assert not missing, f"received but not in history: {missing} (history ends at {stored[-1]})"


async def test_a_single_process_on_memory(database_url: str, tmp_path: Path) -> None:
    server = server_process(tmp_path, "solo", database_url, **TICKS)
    with running(server):
        await server.wait_ready()
        url = f"{server.ws}/v1/ws/prices/AAPL?since=0&token={token('watcher')}"
        async with open_stream(url) as stream:
            watcher = Collector(stream)
            await eventually(lambda: _more_than(watcher, 30))
            # In a thread: this loop keeps reading the stream until the server closes it 1001.
            await asyncio.to_thread(server.stop, signal.SIGTERM)
            seen = [t["seq"] for t in await watcher.stop()]
    assert "not written" not in server.log()
    assert_history_holds(seen, database_url)


@pytest.mark.redis
async def test_the_producer_process_on_redis(
    redis: RedisServer, database_url: str, tmp_path: Path
) -> None:
    web = server_process(
        tmp_path, "web", database_url, BROADCAST_URL=redis.url, PRODUCER="off", **TICKS
    )
    feed_log = tmp_path / "feed.log"
    with running(web), feed_log.open("ab") as log:
        feed = subprocess.Popen(
            [sys.executable, "-m", "app.feed"],
            cwd=ROOT,
            env={**web.env, "INSTANCE_ID": "feed"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            await web.wait_ready()
            url = f"{web.ws}/v1/ws/prices/AAPL?since=0&token={token('watcher')}"
            async with open_stream(url) as stream:
                watcher = Collector(stream)
                await eventually(lambda: _more_than(watcher, 30))
                feed.send_signal(signal.SIGTERM)
                assert await asyncio.to_thread(feed.wait, 15) == 0
                # Every tick it wrote was published: the subscriber gets them all.
                last = history_seqs(database_url, "AAPL")[-1]
                await eventually(lambda: _more_than(watcher, 0, through=last), timeout=10)
                seen = [t["seq"] for t in await watcher.stop()]
        finally:
            if feed.poll() is None:
                feed.kill()
                feed.wait(5)
    assert "not written" not in feed_log.read_text(errors="replace")
    assert_history_holds(seen, database_url)


async def _more_than(watcher: Collector, count: int, *, through: int = 0) -> bool:
    return len(watcher.ticks) > count and watcher.ticks[-1]["seq"] >= through
