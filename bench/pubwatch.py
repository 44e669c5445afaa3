"""How old a tick is when it is published: the producer's part of the latency.

Latency in the table is client receive time − tick `ts`. With the product's own producer
(`pricefeed-own`) that spans two parts: `ts` → the tick published on Redis (the producer
stamps it, writes it to the store, then publishes it) and published → client (the fan-out:
the server's read, the hub, every subscriber's send). `PublishWatch` measures the first
part from outside: a bare subscriber on the load core (`PSUBSCRIBE prices:*`, hiredis, no
redis-py coroutine per message) records its receive time − `ts` of every tick in the load
generator's 0.1 ms buckets. What the clients see beyond it is the fan-out's. It receives
1,000 ticks/s for about 1 % of the load core; its own wake-up (a few tens of µs on a busy
load core) counts in the producer's part.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any
from urllib.parse import urlparse

import hiredis

from bench.loadgen import FINE_BUCKETS, LAT_BUCKETS

_TS = b'"ts":'


def bucket(ms: float) -> int:
    """The load generator's histogram bucket of a latency in ms (bench/loadgen.py)."""
    if ms < 0:
        return 0
    if ms < 1000:
        return int(ms * 10)
    return min(FINE_BUCKETS + int((ms - 1000) / 10), LAT_BUCKETS - 1)


def tick_ts(data: bytes) -> int | None:
    """The `ts` of one published tick frame (ms), without parsing the whole of it."""
    at = data.find(_TS)
    if at < 0:
        return None
    start = at + len(_TS)
    end = start
    while end < len(data) and 48 <= data[end] <= 57:
        end += 1
    return int(data[start:end]) if end > start else None


class _Protocol(asyncio.Protocol):
    def __init__(self, hist: Counter[int]) -> None:
        self._reader = hiredis.Reader()
        self._hist = hist

    def data_received(self, data: bytes) -> None:
        now_ms = time.time() * 1000
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            if type(reply) is list and len(reply) == 4 and reply[0] == b"pmessage":
                # A message may hold several ticks of one channel, a line each.
                for line in reply[3].split(b"\n"):
                    ts = tick_ts(line)
                    if ts is not None:
                        self._hist[bucket(now_ms - ts)] += 1


class PublishWatch:
    """Receive time − `ts` of every tick published on `prices:*`, per mark."""

    def __init__(self) -> None:
        self.hist: Counter[int] = Counter()
        self._transport: asyncio.Transport | None = None

    async def start(self, redis_url: str) -> None:
        url = urlparse(redis_url)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_connection(
            lambda: _Protocol(self.hist), url.hostname or "127.0.0.1", url.port or 6379
        )
        self._transport = transport
        transport.write(b"*2\r\n$10\r\nPSUBSCRIBE\r\n$8\r\nprices:*\r\n")

    def mark(self) -> dict[int, int]:
        """The histogram since the last mark."""
        out = dict(self.hist)
        self.hist.clear()
        return out

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def summary(hist: dict[Any, int]) -> dict[str, float | None]:
    """p50 / p99 in ms of a histogram (bucket -> count)."""
    from bench import report

    counts = {int(k): v for k, v in hist.items()}
    return {"p50_ms": report.percentile(counts, 0.5), "p99_ms": report.percentile(counts, 0.99)}
