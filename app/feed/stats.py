"""What the feed reports beyond its ticks: records rejected (by source and reason) and gaps
in an upstream's own sequence numbers.

The producer may run in another process (`python -m app` starts `python -m app.feed` beside
its workers) or on another instance, so it does not count into this process's metrics: it
adds its counts to a `FeedCounts` every second, which with Redis is a hash every instance
reads when /metrics is scraped (`pricefeed_feed_rejected_total{source,reason}`,
`pricefeed_feed_upstream_gaps_total{source}`), and in process otherwise.

Logs come once per burst: the first rejection of a reason is logged with its detail, the
ones after it within `LOG_EVERY_SECONDS` only as a count in the next line.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Protocol, cast

from redis.asyncio import Redis

logger = logging.getLogger("app.feed")

LOG_EVERY_SECONDS = 10.0


class FeedStats:
    """Counts for one source, kept in memory until `drain` hands them on."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._pending: Counter[str] = Counter()
        self._logged_at: dict[str, float] = {}
        self._unlogged: Counter[str] = Counter()

    def reject(self, reason: str, detail: str) -> None:
        """A record of this source that could not become a tick, skipped."""
        self._pending[f"rejected|{self.source}|{reason}"] += 1
        self._log(reason, f"skipped a record ({reason}): {detail}")

    def upstream_gap(self, symbol: str, missed: int) -> None:
        """The upstream's sequence for `symbol` skipped `missed` numbers."""
        self._pending[f"gaps|{self.source}"] += 1
        self._log(f"gap:{symbol}", f"upstream sequence gap on {symbol}: {missed} missed")

    def _log(self, key: str, text: str) -> None:
        now = time.monotonic()
        if now - self._logged_at.get(key, -LOG_EVERY_SECONDS) < LOG_EVERY_SECONDS:
            self._unlogged[key] += 1
            return
        self._logged_at[key] = now
        more = self._unlogged.pop(key, 0)
        since = f" (and {more} more like it since the last line)" if more else ""
        logger.warning("%s: %s%s", self.source, text, since)

    def drain(self) -> dict[str, int]:
        """The counts since the last drain, by field."""
        pending, self._pending = dict(self._pending), Counter()
        return pending

    def restore(self, counts: dict[str, int]) -> None:
        """Counts a drain took that could not be handed on: kept for the next drain."""
        self._pending.update(counts)


class FeedCounts(Protocol):
    """Cluster-wide totals of the feed's counts."""

    async def add(self, counts: dict[str, int]) -> None: ...

    async def read(self) -> dict[str, int]: ...


class MemoryFeedCounts:
    def __init__(self) -> None:
        self._totals: Counter[str] = Counter()

    async def add(self, counts: dict[str, int]) -> None:
        self._totals.update(counts)

    async def read(self) -> dict[str, int]:
        return dict(self._totals)


class RedisFeedCounts:
    def __init__(self, redis: Redis, *, prefix: str) -> None:
        self._redis = redis
        self._key = f"{prefix}:feed:counts"

    async def add(self, counts: dict[str, int]) -> None:
        if not counts:
            return
        async with self._redis.pipeline(transaction=True) as pipe:
            for field, amount in counts.items():
                pipe.hincrby(self._key, field, amount)
            await pipe.execute()

    async def read(self) -> dict[str, int]:
        raw = cast(dict[bytes, bytes], await self._redis.hgetall(self._key))
        return {k.decode(): int(v) for k, v in raw.items()}


def create_feed_counts(redis: Redis | None, *, prefix: str) -> FeedCounts:
    return MemoryFeedCounts() if redis is None else RedisFeedCounts(redis, prefix=prefix)
