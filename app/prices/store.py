"""The tick store: latest tick and a retention window per symbol, and the candles.

Two implementations behind one interface: in process (for `memory://`) and in Redis (for
`redis://`, shared by every instance). The producer is the only writer; its writes are fenced
by its leader lease, so a producer that lost its lease cannot write over its successor.

A write may carry a `mark`: how far the producer got in its inbox of pushed quotes
(app/feed/inbox.py), kept per symbol in the same atomic write as the tick. A successor reads
the marks back and resumes at the quote after them: none lost, none published twice.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Protocol, cast

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from app.config import Settings
from app.prices.candles import Candle
from app.prices.ticks import Tick, decode_tick

_Entries = list[tuple[bytes, dict[bytes, bytes]]]


class NotLeader(Exception):
    """The fence token given with a write is not the current leader's."""


class TickStore(Protocol):
    async def append(
        self, tick: Tick, candles: dict[str, Candle], *, fence: str | None, mark: str | None = None
    ) -> bool:
        """Keep `tick` (and the candles it updated), and `mark` as its symbol's inbox mark in
        the same write. False if its seq is not new (the mark is kept all the same)."""

    async def read_marks(self) -> dict[str, str]:
        """The inbox mark of each symbol that has one."""

    async def read_latest(self, symbols: Sequence[str]) -> dict[str, Tick]: ...

    async def read_history(self, symbol: str, *, since: int | None, limit: int) -> list[Tick]:
        """Retained ticks with seq > since (all retained if None), oldest first, at most
        `limit` of them: the first ones after `since`, or the newest ones without it."""

    async def read_candles(self, symbol: str, interval: str, *, limit: int) -> list[Candle]: ...

    async def ping(self) -> None: ...


class MemoryTickStore:
    def __init__(self, *, retention: int, candles_kept: int) -> None:
        self._retention = retention
        self._candles_kept = candles_kept
        self._latest: dict[str, Tick] = {}
        self._history: dict[str, deque[Tick]] = {}
        self._candles: dict[tuple[str, str], deque[Candle]] = {}
        self._marks: dict[str, str] = {}

    async def append(
        self, tick: Tick, candles: dict[str, Candle], *, fence: str | None, mark: str | None = None
    ) -> bool:
        if mark is not None:
            self._marks[tick.symbol] = mark
        latest = self._latest.get(tick.symbol)
        if latest is not None and tick.seq <= latest.seq:
            return False
        self._latest[tick.symbol] = tick
        history = self._history.get(tick.symbol)
        if history is None:
            history = self._history[tick.symbol] = deque(maxlen=self._retention)
        history.append(tick)
        for interval, candle in candles.items():
            kept = self._candles.get((tick.symbol, interval))
            if kept is None:
                kept = self._candles[(tick.symbol, interval)] = deque(maxlen=self._candles_kept)
            snapshot = Candle.decode(candle.encode())  # the producer mutates its own copy
            if kept and kept[-1].start == candle.start:
                kept[-1] = snapshot
            else:
                kept.append(snapshot)
        return True

    async def read_marks(self) -> dict[str, str]:
        return dict(self._marks)

    async def read_latest(self, symbols: Sequence[str]) -> dict[str, Tick]:
        return {s: self._latest[s] for s in symbols if s in self._latest}

    async def read_history(self, symbol: str, *, since: int | None, limit: int) -> list[Tick]:
        history = self._history.get(symbol, ())
        if since is None:
            return list(history)[-limit:] if limit else []
        return [t for t in history if t.seq > since][:limit]

    async def read_candles(self, symbol: str, interval: str, *, limit: int) -> list[Candle]:
        kept = self._candles.get((symbol, interval), ())
        return list(kept)[-limit:] if limit else []

    async def ping(self) -> None:
        return None


# Atomic append: fence check, the inbox mark (if any), then the stream entry (its ID is the
# seq, so a replayed or stale seq is refused by Redis itself), the latest hash and the candles.
# KEYS: leader, latest, ticks stream, marks hash, candle keys...
# ARGV: fence, symbol, frame, seq, retention, candles kept, mark, (start, candle)...
_APPEND_LUA = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('NOTLEADER')
end
if ARGV[7] ~= '' then
  redis.call('HSET', KEYS[4], ARGV[2], ARGV[7])
end
local ok = redis.pcall('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], ARGV[4] .. '-0', 't', ARGV[3])
if type(ok) == 'table' and ok.err then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
local kept = tonumber(ARGV[6])
for i = 5, #KEYS do
  local start = ARGV[8 + (i - 5) * 2]
  redis.call('ZREMRANGEBYSCORE', KEYS[i], start, start)
  redis.call('ZADD', KEYS[i], start, ARGV[9 + (i - 5) * 2])
  redis.call('ZREMRANGEBYRANK', KEYS[i], 0, -(kept + 1))
end
return 1
"""


class RedisTickStore:
    def __init__(self, redis: Redis, *, prefix: str, retention: int, candles_kept: int) -> None:
        self._redis = redis
        self._prefix = prefix
        self._retention = retention
        self._candles_kept = candles_kept
        self._append = redis.register_script(_APPEND_LUA)
        self.leader_key = f"{prefix}:producer:leader"
        self._latest_key = f"{prefix}:latest"
        self._marks_key = f"{prefix}:ingest:marks"

    def _stream_key(self, symbol: str) -> str:
        return f"{self._prefix}:ticks:{symbol}"

    def _candle_key(self, symbol: str, interval: str) -> str:
        return f"{self._prefix}:candles:{symbol}:{interval}"

    async def append(
        self, tick: Tick, candles: dict[str, Candle], *, fence: str | None, mark: str | None = None
    ) -> bool:
        keys = [self.leader_key, self._latest_key, self._stream_key(tick.symbol), self._marks_key]
        args: list[str | int] = [
            fence or "",
            tick.symbol,
            tick.frame,
            tick.seq,
            self._retention,
            self._candles_kept,
            mark or "",
        ]
        for interval, candle in candles.items():
            keys.append(self._candle_key(tick.symbol, interval))
            args += [candle.start, candle.encode()]
        try:
            written = await self._append(keys=keys, args=args)
        except ResponseError as exc:
            if "NOTLEADER" in str(exc):
                raise NotLeader from exc
            raise
        return bool(written)

    async def read_marks(self) -> dict[str, str]:
        raw = cast(dict[bytes, bytes], await self._redis.hgetall(self._marks_key))
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def read_latest(self, symbols: Sequence[str]) -> dict[str, Tick]:
        if not symbols:
            return {}
        frames = cast(list[bytes | None], await self._redis.hmget(self._latest_key, list(symbols)))
        return {
            symbol: decode_tick(frame.decode())
            for symbol, frame in zip(symbols, frames, strict=True)
            if frame is not None
        }

    async def read_history(self, symbol: str, *, since: int | None, limit: int) -> list[Tick]:
        if limit <= 0:
            return []
        key = self._stream_key(symbol)
        if since is None:
            entries = list(reversed(cast(_Entries, await self._redis.xrevrange(key, count=limit))))
        else:
            entries = cast(
                _Entries, await self._redis.xrange(key, min=f"({max(since, 0)}-0", count=limit)
            )
        return [decode_tick(fields[b"t"].decode()) for _id, fields in entries]

    async def read_candles(self, symbol: str, interval: str, *, limit: int) -> list[Candle]:
        if limit <= 0:
            return []
        key = self._candle_key(symbol, interval)
        members = cast(list[bytes], await self._redis.zrange(key, -limit, -1))
        return [Candle.decode(m.decode()) for m in members]

    async def ping(self) -> None:
        await self._redis.ping()


def create_tick_store(settings: Settings, redis: Redis | None) -> TickStore:
    """In Redis when the broker is Redis (shared by every instance), else in this process."""
    if redis is None:
        return MemoryTickStore(
            retention=settings.retention_ticks, candles_kept=settings.candles_kept
        )
    return RedisTickStore(
        redis,
        prefix=settings.redis_key_prefix,
        retention=settings.retention_ticks,
        candles_kept=settings.candles_kept,
    )
