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
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from app.config import Settings
from app.prices import write_script
from app.prices.candles import Candle
from app.prices.ticks import Tick, decode_tick
from app.redis_commands import CommandConnection, Script

_Entries = list[tuple[bytes, dict[bytes, bytes]]]


class NotLeader(Exception):
    """The fence token given with a write is not the current leader's."""


class EarlierWriteMissing(RedisError):
    """A write named the write it follows, and that one never reached the store (lost with a
    connection, or refused): taking this one would leave a gap behind it."""


@dataclass(frozen=True, slots=True)
class Chain:
    """Where a write stands among one producer's writes: its own name, and the name of the
    write stamped just before it (None: the first of a term, which follows nothing). The
    store refuses a write whose predecessor it never took (`EarlierWriteMissing`)."""

    name: str
    follows: str | None


@dataclass(frozen=True, slots=True)
class ScriptedWrite:
    """One `append_runs` as a Lua chunk and its arguments, for a script that runs more after
    it in the same call (the broker's publish of the same ticks, app/broker/backends.py).
    The chunk's `return` is the per-run counts of ticks not new, or an error reply; its
    arguments are ARGV[1..len(args)]. `commands`: the store's write connection, which the
    script goes on, so that every write of the store runs in call order, however sent."""

    lua: str
    keys: list[str]
    args: list[str | int | bytes]
    commands: CommandConnection


@dataclass(frozen=True, slots=True)
class Run:
    """A symbol's ticks of one burst, in seq order; every candle state they left, oldest
    first per interval: a candle they closed by starting the next one comes before it, in its
    final state (the Redis store moves it out of the forming candles then); and the inbox
    mark of its last pushed quote, if any."""

    symbol: str
    ticks: list[Tick]
    candles: list[tuple[str, Candle]] = field(default_factory=list)
    mark: str | None = None


class TickStore(Protocol):
    @property
    def ordered_writes(self) -> bool:
        """Whether concurrent `append_runs` calls are applied in the order they were called
        (each sent before its first await): then a caller may start the next write before the
        previous one answered."""

    async def append_runs(
        self, runs: Sequence[Run], *, fence: str | None, chain: Chain | None = None
    ) -> list[int]:
        """Keep each run's ticks, candles and mark, all in one write. Per run, how many of its
        first ticks were not new (their seq was kept already): the rest were kept. With
        `chain`, refused (EarlierWriteMissing) unless the write it follows was kept."""

    def scripted_write(
        self, runs: Sequence[Run], *, fence: str | None, chain: Chain
    ) -> ScriptedWrite | None:
        """`append_runs` as a Lua chunk for a caller's script (None: not on a connection of
        its own, app/redis_commands.py).
        `written` turns that script's outcome into `append_runs`'."""

    async def written(self, outcome: Awaitable[Any]) -> list[int]:
        """The outcome of a `scripted_write`'s script as `append_runs` has it."""

    async def append(
        self, tick: Tick, candles: dict[str, Candle], *, fence: str | None, mark: str | None = None
    ) -> bool:
        """One tick as a run of one. False if its seq is not new (the mark is kept all the
        same)."""

    async def read_marks(self) -> dict[str, str]:
        """The inbox mark of each symbol that has one."""

    async def read_latest(self, symbols: Sequence[str]) -> dict[str, Tick]: ...

    async def read_history(self, symbol: str, *, since: int | None, limit: int) -> list[Tick]:
        """Retained ticks with seq > since (all retained if None), oldest first, at most
        `limit` of them: the first ones after `since`, or the newest ones without it."""

    async def read_candles(self, symbol: str, interval: str, *, limit: int) -> list[Candle]: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class MemoryTickStore:
    def __init__(self, *, retention: int, candles_kept: int) -> None:
        self._retention = retention
        self._candles_kept = candles_kept
        self._latest: dict[str, Tick] = {}
        self._history: dict[str, deque[Tick]] = {}
        self._candles: dict[tuple[str, str], deque[Candle]] = {}
        self._marks: dict[str, str] = {}

    @property
    def ordered_writes(self) -> bool:
        return True  # each write is done before its call returns

    async def append_runs(
        self, runs: Sequence[Run], *, fence: str | None, chain: Chain | None = None
    ) -> list[int]:
        # Each write is done before its call returns: none can go missing before a next one.
        return [self._append_run(run) for run in runs]

    def scripted_write(
        self, runs: Sequence[Run], *, fence: str | None, chain: Chain
    ) -> ScriptedWrite | None:
        return None

    async def written(self, outcome: Awaitable[Any]) -> list[int]:
        raise NotImplementedError("the memory store runs no script")

    async def append(
        self, tick: Tick, candles: dict[str, Candle], *, fence: str | None, mark: str | None = None
    ) -> bool:
        return self._append_run(Run(tick.symbol, [tick], list(candles.items()), mark)) == 0

    def _append_run(self, run: Run) -> int:
        symbol = run.symbol
        if run.mark is not None:
            self._marks[symbol] = run.mark
        latest = self._latest.get(symbol)
        fresh = [t for t in run.ticks if latest is None or t.seq > latest.seq]
        if not fresh:
            return len(run.ticks)
        self._latest[symbol] = fresh[-1]
        history = self._history.get(symbol)
        if history is None:
            history = self._history[symbol] = deque(maxlen=self._retention)
        history.extend(fresh)
        for interval, candle in run.candles:
            kept = self._candles.get((symbol, interval))
            if kept is None:
                kept = self._candles[(symbol, interval)] = deque(maxlen=self._candles_kept)
            snapshot = Candle.decode(candle.encode())  # the producer mutates its own copy
            if kept and kept[-1].start == candle.start:
                kept[-1] = snapshot
            else:
                kept.append(snapshot)
        return len(run.ticks) - len(fresh)

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

    async def close(self) -> None:
        return None


class RedisTickStore:
    """Reads with redis-py (`redis`). Writes with it too, or, given `commands` (the same Redis),
    on that lean connection (app/redis_commands.py): a third of the CPU a write, and writes in
    call order, so that the producer may send one before the previous one answered."""

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str,
        retention: int,
        candles_kept: int,
        commands: CommandConnection | None = None,
    ) -> None:
        self._redis = redis
        self._commands = commands
        self._prefix = prefix
        self._retention = retention
        self._candles_kept = candles_kept
        self._append = redis.register_script(write_script.APPEND_LUA)
        self._append_script = Script(write_script.APPEND_LUA)
        self.leader_key = f"{prefix}:producer:leader"
        self._latest_key = f"{prefix}:latest"
        self._marks_key = f"{prefix}:ingest:marks"
        self._chain_key = f"{prefix}:producer:written"  # the name of the last write taken

    def _stream_key(self, symbol: str) -> str:
        return f"{self._prefix}:ticks:{symbol}"

    def _candle_key(self, symbol: str, interval: str) -> str:
        """The closed candles of `symbol` at `interval` (a sorted set by start)."""
        return f"{self._prefix}:candles:{symbol}:{interval}"

    def _forming_key(self, symbol: str) -> str:
        """The forming candle of `symbol` at each interval (a hash)."""
        return f"{self._prefix}:candle:{symbol}"

    async def append_runs(
        self, runs: Sequence[Run], *, fence: str | None, chain: Chain | None = None
    ) -> list[int]:
        if not runs:
            return []
        keys, args = self._write(runs, fence=fence, chain=chain)
        if self._commands is None:
            return await self._outcome(self._append(keys=keys, args=args))
        # Sent before the first await: writes reach Redis in call order.
        sent = self._commands.send_script(self._append_script, keys, args)
        return await self._outcome(self._commands.answer(sent))

    def scripted_write(
        self, runs: Sequence[Run], *, fence: str | None, chain: Chain
    ) -> ScriptedWrite | None:
        if self._commands is None:  # redis-py: writes in no set order
            return None
        keys, args = self._write(runs, fence=fence, chain=chain)
        return ScriptedWrite(write_script.APPEND_LUA, keys, args, self._commands)

    async def written(self, outcome: Awaitable[Any]) -> list[int]:
        return await self._outcome(outcome)

    async def _outcome(self, outcome: Awaitable[Any]) -> list[int]:
        try:
            skipped = await outcome
        except ResponseError as exc:
            if "NOTLEADER" in str(exc):
                raise NotLeader from exc
            if str(exc).startswith("EARLIERMISSING"):
                raise EarlierWriteMissing(str(exc)) from exc
            raise
        return [int(n) for n in skipped]

    def _write(
        self, runs: Sequence[Run], *, fence: str | None, chain: Chain | None
    ) -> tuple[list[str], list[str | int | bytes]]:
        """The keys and arguments of the write script for `runs`."""
        return write_script.arguments(
            runs,
            [self.leader_key, self._latest_key, self._marks_key, self._chain_key],
            prefix=self._prefix,
            retention=self._retention,
            candles_kept=self._candles_kept,
            fence=fence,
            chain=chain,
        )

    async def append(
        self, tick: Tick, candles: dict[str, Candle], *, fence: str | None, mark: str | None = None
    ) -> bool:
        run = Run(tick.symbol, [tick], list(candles.items()), mark)
        return (await self.append_runs([run], fence=fence)) == [0]

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
        # In one transaction: a write that closes the forming candle moves it to the sorted
        # set, and between two separate reads it would be in neither.
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zrange(self._candle_key(symbol, interval), -limit, -1)
            pipe.hget(self._forming_key(symbol), interval)
            members, forming = cast(tuple[list[bytes], bytes | None], await pipe.execute())
        candles = [Candle.decode(m.decode()) for m in members]
        if forming is not None:
            candle = Candle.decode(forming.decode())
            if candles and candles[-1].start == candle.start:  # written there before the hash
                candles[-1] = candle
            elif not candles or candles[-1].start < candle.start:
                candles.append(candle)
        return candles[-limit:]

    @property
    def ordered_writes(self) -> bool:
        return self._commands is not None  # redis-py: each call on whichever pooled connection

    async def ping(self) -> None:
        await self._redis.ping()

    async def close(self) -> None:
        """Close the write connection (`redis` is its owner's to close)."""
        if self._commands is not None:
            await self._commands.close()


def create_tick_store(settings: Settings, redis: Redis | None) -> TickStore:
    """In Redis when the broker is Redis (shared by every instance), else in this process.
    Close it after use (Redis: its write connection)."""
    if redis is None:
        return MemoryTickStore(
            retention=settings.retention_ticks, candles_kept=settings.candles_kept
        )
    return RedisTickStore(
        redis,
        prefix=settings.redis_key_prefix,
        retention=settings.retention_ticks,
        candles_kept=settings.candles_kept,
        commands=CommandConnection.like(redis),  # opened by the first write: the producer's
    )
