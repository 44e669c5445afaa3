"""How the history writer is doing, for every instance's /metrics and /readyz.

The writer runs in the leader's producer, which may be another process or another instance,
so (as the feed's counts do, app/feed/stats.py) it hands its state on every second: with
Redis to a hash every instance reads when /metrics or /readyz is asked, in process otherwise.
A state nobody refreshed for `STALE_AFTER_SECONDS` (no leader writing) reads as degraded; where
there is no state at all, /readyz tells "no producer to write it" from "a writer not heard
from" (app/ops.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, Protocol, cast

from redis.asyncio import Redis

STALE_AFTER_SECONDS = 10.0
# Behind by more than this, history is degraded: a database that keeps up writes every 250 ms.
DEGRADED_LAG_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class HistoryState:
    lag_seconds: float  # age of the oldest published tick not written yet (0: none waiting)
    failing: bool  # the last write failed (the database is slow or down)
    dropped: int  # ticks dropped from a full buffer, cluster-wide, ever
    at: float  # epoch seconds of the report

    def health(self, now: float | None = None) -> Literal["ok", "degraded"]:
        stale = (now or time.time()) - self.at > STALE_AFTER_SECONDS
        if stale or self.failing or self.lag_seconds > DEGRADED_LAG_SECONDS:
            return "degraded"
        return "ok"


class HistoryReport(Protocol):
    async def write(self, *, lag_seconds: float, failing: bool, dropped: int) -> None:
        """The writer's state now; `dropped`: the ticks dropped since its last report."""

    async def read(self) -> HistoryState | None: ...


class MemoryHistoryReport:
    def __init__(self) -> None:
        self._state: HistoryState | None = None

    async def write(self, *, lag_seconds: float, failing: bool, dropped: int) -> None:
        total = dropped + (self._state.dropped if self._state else 0)
        self._state = HistoryState(lag_seconds, failing, total, time.time())

    async def read(self) -> HistoryState | None:
        return self._state


class RedisHistoryReport:
    def __init__(self, redis: Redis, *, prefix: str) -> None:
        self._redis = redis
        self._key = f"{prefix}:history:status"

    async def write(self, *, lag_seconds: float, failing: bool, dropped: int) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                self._key,
                mapping={"lag": repr(lag_seconds), "failing": int(failing), "at": time.time()},
            )
            if dropped:
                pipe.hincrby(self._key, "dropped", dropped)
            await pipe.execute()

    async def read(self) -> HistoryState | None:
        raw = cast(dict[bytes, bytes], await self._redis.hgetall(self._key))
        if b"at" not in raw:
            return None
        return HistoryState(
            lag_seconds=float(raw[b"lag"]),
            failing=raw[b"failing"] == b"1",
            dropped=int(raw.get(b"dropped", b"0")),
            at=float(raw[b"at"]),
        )


def create_history_report(redis: Redis | None, *, prefix: str) -> HistoryReport:
    return MemoryHistoryReport() if redis is None else RedisHistoryReport(redis, prefix=prefix)
