"""app/feed/stats.py: a source's rejections and upstream gaps, counted once each, logged once
per burst, and added up across the cluster where every instance's /metrics reads them."""

from __future__ import annotations

import logging

import pytest

from app.feed.stats import FeedStats, MemoryFeedCounts, RedisFeedCounts
from app.redis_client import create_redis
from tests.support import RedisServer


def test_counts_by_source_and_reason() -> None:
    stats = FeedStats("replay")
    stats.reject("bad_price", "line 3: 'abc'")
    stats.reject("bad_price", "line 4: '-1'")
    stats.reject("unknown_symbol", "line 9: 'NOPE'")
    stats.upstream_gap("BTC-USD", 3)
    assert stats.drain() == {
        "rejected|replay|bad_price": 2,
        "rejected|replay|unknown_symbol": 1,
        "gaps|replay": 1,
    }
    assert stats.drain() == {}  # each count handed on once


def test_counts_not_handed_on_are_kept_for_the_next_drain() -> None:
    stats = FeedStats("coinbase")
    stats.reject("malformed", "not JSON")
    taken = stats.drain()
    stats.restore(taken)
    stats.reject("malformed", "not JSON")
    assert stats.drain() == {"rejected|coinbase|malformed": 2}


def test_a_burst_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    stats = FeedStats("replay")
    with caplog.at_level(logging.WARNING, logger="app.feed"):
        for line in range(100):
            stats.reject("bad_price", f"line {line}")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["replay: skipped a record (bad_price): line 0"]


async def test_memory_counts_add_up() -> None:
    counts = MemoryFeedCounts()
    await counts.add({"rejected|replay|bad_price": 2})
    await counts.add({"rejected|replay|bad_price": 1, "gaps|replay": 4})
    assert await counts.read() == {"rejected|replay|bad_price": 3, "gaps|replay": 4}


async def test_redis_counts_are_shared_by_every_reader(redis: RedisServer) -> None:
    writer = create_redis(redis.url)
    reader = create_redis(redis.url)
    try:
        await RedisFeedCounts(writer, prefix="t").add({"gaps|coinbase": 2})
        await RedisFeedCounts(writer, prefix="t").add({"gaps|coinbase": 1})
        assert await RedisFeedCounts(reader, prefix="t").read() == {"gaps|coinbase": 3}
    finally:
        await writer.aclose()
        await reader.aclose()
