"""The benchmark's producer part of the latency (bench/pubwatch.py): every tick published on a
price channel is counted once, in the load generator's histogram buckets, by its age."""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis

from bench.loadgen import FINE_BUCKETS, bucket_upper_ms
from bench.pubwatch import PublishWatch, bucket, summary, tick_ts
from tests.support import RedisServer


def frame(seq: int, ts: int) -> str:
    return f'{{"type":"tick","symbol":"AAPL","price":"1.00","ts":{ts},"seq":{seq}}}'


def test_a_tick_frame_gives_its_ts_and_a_bucket_its_latency() -> None:
    assert tick_ts(frame(1, 1764300000123).encode()) == 1764300000123
    assert tick_ts(b'{"type":"tick"}') is None
    assert bucket(0.05) == 0 and bucket(2.34) == 23 and bucket(-1.0) == 0
    assert bucket(1500.0) == FINE_BUCKETS + 50
    assert bucket_upper_ms(bucket(2.34)) == 2.4


async def test_every_published_tick_is_counted_once_by_its_age(redis: RedisServer) -> None:
    watch = PublishWatch()
    await watch.start(redis.url)
    client = Redis.from_url(redis.url)
    try:
        await asyncio.sleep(0.1)  # subscribed
        old = int(time.time() * 1000) - 40  # 40 ms before it is published
        await client.publish("prices:AAPL", frame(1, old))
        # Several ticks of one channel in one message, a line each (the producer's runs).
        await client.publish("prices:MSFT", frame(1, old) + "\n" + frame(2, old))
        await client.publish("other:AAPL", frame(3, old))  # not a price channel
        for _ in range(100):
            if sum(watch.hist.values()) == 3:
                break
            await asyncio.sleep(0.02)
        hist = watch.mark()
        assert sum(hist.values()) == 3
        assert 40 <= summary(hist)["p50_ms"] < 1000  # type: ignore[operator]
        assert watch.mark() == {}  # counted from the last mark
    finally:
        watch.close()
        await client.aclose()
