"""The producer's inbox: pushed quotes (`POST /v1/ingest`) on their way to the one producer.

Any instance takes a push; only the lease holder stamps `seq`, so a push is handed over, never
published by the instance that took it. Two sides:

- `push(quotes)` (the route, on any instance): one accepted batch becomes one entry. When the
  backlog is at its cap (INGEST_MAX_PENDING_BATCHES) it waits up to INGEST_WAIT_SECONDS for
  room, then raises `InboxFull`; `InboxUnavailable` when Redis cannot be reached. It returns
  only once the entry is kept: that is what a `202` promises.
- `read()` / `ack(entry_id)` (the leader): the entries oldest first, starting from the oldest
  not yet acknowledged, then each new one as it comes; an entry is acknowledged (and goes)
  once every quote of it is published.

The cap is kept by refusing pushes, never by trimming: an entry leaves only when applied.

With Redis the inbox is a stream (`{prefix}:ingest`, shared by every instance, read by the
leader with XREAD BLOCK on a connection of its own); with `memory://` a queue in this process.

How far the leader got is a `Position` (entry, quote index) per symbol, which the producer
writes with each tick in the same atomic store write (app/prices/store.py `mark`). A new leader
re-reads the unacknowledged entries and skips every quote at or before its symbol's mark:
after a leader dies mid-batch, its successor resumes at exactly the next quote.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from functools import partial
from typing import Protocol, cast

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.config import Settings
from app.feed.sources import Quote
from app.redis_client import create_redis

logger = logging.getLogger(__name__)

READ_COUNT = 64  # entries per XREAD
READ_BLOCK_MS = 1000  # well inside the reader connection's socket timeout
_PUSH_RETRY_FIRST, _PUSH_RETRY_CAP = 0.01, 0.2  # seconds between pushes refused for room


class InboxFull(Exception):
    """The backlog stayed at its cap for the whole wait: the leader is behind, or gone."""


class InboxUnavailable(Exception):
    """The inbox cannot take pushes (Redis unreachable)."""


@dataclass(frozen=True, order=True, slots=True)
class Position:
    """A quote's place in the inbox: its entry's id (as the pair Redis orders stream ids by)
    and its index in that entry. Ordered as the quotes were accepted."""

    entry: tuple[int, int]
    index: int

    def encode(self) -> str:
        return f"{self.entry[0]}-{self.entry[1]}:{self.index}"

    @classmethod
    def decode(cls, raw: str) -> Position | None:
        """None for a mark that is not a position (written by something else)."""
        entry, _, index = raw.partition(":")
        key = entry_key(entry)
        if key is None or not index.isdigit():
            return None
        return cls(key, int(index))


def entry_key(entry_id: str) -> tuple[int, int] | None:
    """`"1733580000000-3"` → `(1733580000000, 3)`: stream ids compare as such pairs."""
    ms, _, seq = entry_id.partition("-")
    if not (ms.isdigit() and seq.isdigit()):
        return None
    return int(ms), int(seq)


@dataclass(frozen=True, slots=True)
class InboxEntry:
    """One accepted batch. `quotes` is empty if the entry could not be read (logged)."""

    id: str
    quotes: list[Quote]

    def position(self, index: int) -> Position:
        key = entry_key(self.id)
        assert key is not None  # ids come from Redis or MemoryInbox, both in this form
        return Position(key, index)


# A quote on the wire between instances: a list, decimals as strings, None where absent.
def encode_quotes(quotes: Sequence[Quote]) -> bytes:
    def text(value: Decimal | None) -> str | None:
        return None if value is None else str(value)

    return orjson.dumps(
        [
            [
                q.symbol,
                str(q.price),
                text(q.bid),
                text(q.ask),
                text(q.volume),
                text(q.size),
                q.side,
                q.source_ts,
            ]
            for q in quotes
        ]
    )


def decode_quotes(raw: bytes) -> list[Quote]:
    """The quotes `encode_quotes` wrote; ValueError for anything else."""

    def number(value: object) -> Decimal | None:
        return None if value is None else Decimal(cast(str, value))

    try:
        rows = orjson.loads(raw)
        return [
            Quote(
                symbol=symbol,
                price=Decimal(price),
                bid=number(bid),
                ask=number(ask),
                volume=number(volume),
                size=number(size),
                side=side,
                source_ts=source_ts,
            )
            for symbol, price, bid, ask, volume, size, side, source_ts in rows
        ]
    except (ArithmeticError, TypeError, ValueError) as exc:
        raise ValueError(f"not a batch of quotes ({exc})") from exc


class Inbox(Protocol):
    async def push(self, quotes: Sequence[Quote]) -> str:
        """Keep `quotes` as one entry; its id. InboxFull, InboxUnavailable."""

    def read(self) -> AsyncGenerator[list[InboxEntry], None]:
        """Every unacknowledged entry, oldest first, then the new ones as they come: what is
        there at each look, together (the producer writes them in one go)."""

    async def ack(self, entry_ids: Sequence[str]) -> None:
        """Every quote of these entries is published: they may go."""


class MemoryInbox:
    """`memory://`: one process takes the pushes and runs the producer."""

    def __init__(self, *, max_pending: int, wait_seconds: float) -> None:
        self._max_pending = max_pending
        self._wait_seconds = wait_seconds
        self._entries: dict[str, list[Quote]] = {}  # in the order they were pushed
        self._pushed = 0
        self._changed = asyncio.Condition()

    async def push(self, quotes: Sequence[Quote]) -> str:
        async with self._changed:
            if len(self._entries) >= self._max_pending:
                try:
                    async with asyncio.timeout(self._wait_seconds):
                        await self._changed.wait_for(lambda: len(self._entries) < self._max_pending)
                except TimeoutError:
                    raise InboxFull from None
            self._pushed += 1
            entry_id = f"{self._pushed}-0"
            self._entries[entry_id] = list(quotes)
            self._changed.notify_all()
            return entry_id

    async def read(self) -> AsyncGenerator[list[InboxEntry], None]:
        last = (0, 0)
        while True:
            async with self._changed:
                await self._changed.wait_for(partial(self._newer_than, last))
                fresh = [InboxEntry(i, q) for i, q in self._entries.items() if _key(i) > last]
            last = _key(fresh[-1].id)
            yield fresh

    def _newer_than(self, last: tuple[int, int]) -> bool:
        return bool(self._entries) and _key(next(reversed(self._entries))) > last

    async def ack(self, entry_ids: Sequence[str]) -> None:
        async with self._changed:
            for entry_id in entry_ids:
                self._entries.pop(entry_id, None)
            self._changed.notify_all()  # room for a push that waits


def _key(entry_id: str) -> tuple[int, int]:
    key = entry_key(entry_id)
    assert key is not None
    return key


# Refuse, never trim: an entry only goes once the leader has applied it (ack). KEYS[2] names
# this push: redis-py re-sends a command whose reply a dropped connection lost, and the
# re-sent push must find its first entry rather than add a second.
_PUSH_LUA = """
local done = redis.call('GET', KEYS[2])
if done then
  return done
end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then
  return false
end
local id = redis.call('XADD', KEYS[1], '*', 'q', ARGV[2])
redis.call('SET', KEYS[2], id, 'PX', ARGV[3])
return id
"""
_PUSH_REMEMBERED_MS = 60_000  # far longer than a push's retries take

_Entries = list[tuple[bytes, dict[bytes, bytes]]]


class RedisInbox:
    """A Redis stream every instance pushes to and the leader reads."""

    def __init__(
        self, redis: Redis, *, url: str, prefix: str, max_pending: int, wait_seconds: float
    ) -> None:
        self._redis = redis
        self._url = url  # the reader's own connection
        self._key = f"{prefix}:ingest"
        self._max_pending = max_pending
        self._wait_seconds = wait_seconds
        self._push = redis.register_script(_PUSH_LUA)

    async def push(self, quotes: Sequence[Quote]) -> str:
        payload = encode_quotes(quotes)
        keys = [self._key, f"{self._key}:push:{secrets.token_hex(12)}"]
        args: list[int | bytes] = [self._max_pending, payload, _PUSH_REMEMBERED_MS]
        deadline = time.monotonic() + self._wait_seconds
        delay = _PUSH_RETRY_FIRST
        while True:
            try:
                added = await self._push(keys=keys, args=args)
            except RedisError as exc:
                raise InboxUnavailable(f"Redis unreachable ({type(exc).__name__})") from exc
            if added is not None:
                return cast(bytes, added).decode()
            left = deadline - time.monotonic()
            if left <= 0:
                raise InboxFull
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, _PUSH_RETRY_CAP)

    async def read(self) -> AsyncGenerator[list[InboxEntry], None]:
        # A connection of its own: a blocked XREAD must not hold one the store writes need.
        reader = create_redis(self._url, socket_timeout=READ_BLOCK_MS / 1000 + 5)
        last = "0-0"  # every entry still there: the unacknowledged ones
        try:
            while True:
                reply = cast(
                    list[tuple[bytes, _Entries]],
                    await reader.xread({self._key: last}, count=READ_COUNT, block=READ_BLOCK_MS),
                )
                for _stream, entries in reply or []:
                    if not entries:
                        continue
                    fresh = [
                        InboxEntry(raw_id.decode(), self._decode(raw_id.decode(), fields))
                        for raw_id, fields in entries
                    ]
                    last = fresh[-1].id
                    yield fresh
        finally:
            await reader.aclose()

    def _decode(self, entry_id: str, fields: dict[bytes, bytes]) -> list[Quote]:
        try:
            return decode_quotes(fields.get(b"q", b""))
        except ValueError as exc:
            # Only pushes write here; something else did. Dropped, and said so.
            logger.error("inbox: entry %s of %s dropped: %s", entry_id, self._key, exc)
            return []

    async def ack(self, entry_ids: Sequence[str]) -> None:
        if entry_ids:
            await self._redis.xdel(self._key, *entry_ids)


def create_inbox(settings: Settings, redis: Redis | None) -> Inbox:
    """In Redis when the broker is Redis (every instance pushes, the leader reads), else in
    this process."""
    if redis is None:
        return MemoryInbox(
            max_pending=settings.ingest_max_pending_batches,
            wait_seconds=settings.ingest_wait_seconds,
        )
    return RedisInbox(
        redis,
        url=settings.broadcast_url,
        prefix=settings.redis_key_prefix,
        max_pending=settings.ingest_max_pending_batches,
        wait_seconds=settings.ingest_wait_seconds,
    )
