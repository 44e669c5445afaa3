"""app/feed/inbox.py with the producer: a leader that dies mid-batch is succeeded at exactly
the next quote (real Redis), quotes of a symbol disabled after the push are counted and
skipped, and the in-process inbox waits for room, then refuses."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from decimal import Decimal
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from app.broker import Broker
from app.feed.inbox import InboxFull, MemoryInbox, RedisInbox
from app.feed.leader import LocalLease, RedisLease
from app.feed.producer import Producer
from app.feed.sources import Quote
from app.feed.sources.ingest import IngestOnly
from app.feed.stats import MemoryFeedCounts
from app.instruments.catalog import Catalog
from app.instruments.repository import InstrumentInfo
from app.prices.store import Chain, MemoryTickStore, RedisTickStore, Run, TickStore
from app.redis_client import create_redis
from tests.support import RedisServer

AAPL = InstrumentInfo("AAPL", "Apple", "equity", 4, Decimal("190"))
MSFT = InstrumentInfo("MSFT", "Microsoft", "equity", 4, Decimal("415"))
PREFIX = "t"


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(producer: Producer) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(producer.run())
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def producer(
    *, store: TickStore, lease: Any, inbox: Any, catalog: Catalog, broker: Broker, **more: Any
) -> Producer:
    return Producer(
        source=IngestOnly(),
        instruments=catalog,
        store=store,
        broker=broker,
        lease=lease,
        inbox=inbox,
        **more,
    )


class DyingStore(RedisTickStore):
    """Redis goes away under this leader after `survive` writes: the last one lands, but its
    answer never comes back (the leader cannot know it landed); then its writes hang, so a
    leader that leads again writes nothing more."""

    def __init__(self, redis: Redis, *, survive: int) -> None:
        super().__init__(redis, prefix=PREFIX, retention=1000, candles_kept=10)
        self.survive = survive
        self.died = asyncio.Event()

    async def append_runs(
        self, runs: Sequence[Run], *, fence: str | None, chain: Chain | None = None
    ) -> list[int]:
        if self.died.is_set():
            await asyncio.Event().wait()
        written = await super().append_runs(runs, fence=fence, chain=chain)
        self.survive -= 1
        if self.survive == 0:
            self.died.set()
            raise RedisConnectionError("the leader is gone")
        return written


class CountingStore(RedisTickStore):
    """Counts the ticks of each write."""

    def __init__(self, redis: Redis) -> None:
        super().__init__(redis, prefix=PREFIX, retention=1000, candles_kept=10)
        self.calls: list[int] = []

    async def append_runs(
        self, runs: Sequence[Run], *, fence: str | None, chain: Chain | None = None
    ) -> list[int]:
        self.calls.append(sum(len(run.ticks) for run in runs))
        return await super().append_runs(runs, fence=fence, chain=chain)


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    broker = Broker("memory://")
    await broker.connect()
    yield broker
    await broker.disconnect()


@pytest.mark.redis
class TestLeaderChange:
    async def test_a_leader_that_dies_before_taking_a_batch_off_is_resumed_after_it(
        self, redis: RedisServer, broker: Broker
    ) -> None:
        client = create_redis(redis.url)
        inbox = RedisInbox(client, url=redis.url, prefix=PREFIX, max_pending=100, wait_seconds=0)
        batches = [
            [Quote("AAPL" if i % 3 else "MSFT", Decimal(f"{100 + b}.{i:04d}")) for i in range(6)]
            for b in range(4)
        ]
        catalog = Catalog([AAPL, MSFT])
        store = RedisTickStore(client, prefix=PREFIX, retention=1000, candles_kept=10)

        async def lease(name: str) -> RedisLease:
            return RedisLease(client, key=store.leader_key, lease_ms=1500, instance=name)

        dying = DyingStore(client, survive=2)  # the second write is stored, never taken off
        first = await lease("first")
        gone = producer(store=dying, lease=first, inbox=inbox, catalog=catalog, broker=broker)
        async with running(gone):
            await inbox.push(batches[0])
            await eventually(lambda: _empty(client))  # published and taken off
            await inbox.push(batches[1])
            await asyncio.wait_for(dying.died.wait(), 10)

            async def stood_down() -> bool:
                return not gone.is_leader

            await eventually(stood_down)  # its failure handled: now it stops as asked
        await first.release()
        published = await self.published(store)
        assert sum(len(p) for p in published.values()) == 12
        assert await client.xlen(f"{PREFIX}:ingest") == 1, "the first batch went, and only it"
        for quotes in batches[2:]:
            await inbox.push(quotes)

        async with running(
            producer(
                store=store,
                lease=await lease("second"),
                inbox=inbox,
                catalog=catalog,
                broker=broker,
            )
        ):

            async def all_out() -> bool:
                return sum(len(p) for p in (await self.published(store)).values()) >= 24

            await eventually(all_out)
            await eventually(lambda: _empty(client))
        published = await self.published(store)

        for symbol in ("AAPL", "MSFT"):
            pushed = [str(q.price) for b in batches for q in b if q.symbol == symbol]
            assert [price for _seq, price in published[symbol]] == pushed, symbol
            seqs = [seq for seq, _price in published[symbol]]
            assert seqs == list(range(1, len(pushed) + 1)), symbol
        await client.aclose()

    async def test_entries_that_arrive_together_are_written_together(
        self, redis: RedisServer, broker: Broker
    ) -> None:
        client = create_redis(redis.url)
        inbox = RedisInbox(client, url=redis.url, prefix=PREFIX, max_pending=100, wait_seconds=0)
        for b in range(5):
            await inbox.push([Quote("AAPL", Decimal(f"{100 + b}.0000"))])
        writes = CountingStore(client)
        lease = RedisLease(client, key=writes.leader_key, lease_ms=1500, instance="one")
        catalog = Catalog([AAPL, MSFT])
        async with running(
            producer(store=writes, lease=lease, inbox=inbox, catalog=catalog, broker=broker)
        ):
            await eventually(lambda: _empty(client))
        await client.aclose()

        assert writes.calls == [5], "five pushes waiting: one store write"

    @staticmethod
    async def published(store: RedisTickStore) -> dict[str, list[tuple[int, str]]]:
        return {
            symbol: [
                (t.seq, str(t.as_dict()["price"]))
                for t in await store.read_history(symbol, since=0, limit=100)
            ]
            for symbol in ("AAPL", "MSFT")
        }


async def _empty(client: Redis) -> bool:
    return await client.xlen(f"{PREFIX}:ingest") == 0


class TestDisabledAfterThePush:
    async def test_counted_under_ingest_and_skipped(self, broker: Broker) -> None:
        catalog = Catalog([AAPL, MSFT])
        inbox = MemoryInbox(max_pending=10, wait_seconds=0)
        await inbox.push(
            [Quote("AAPL", Decimal("190.1")), Quote("MSFT", Decimal("415.1")),
             Quote("AAPL", Decimal("190.2"))]
        )  # fmt: skip
        catalog.replace([AAPL])  # MSFT disabled before the producer got to it
        store = MemoryTickStore(retention=100, candles_kept=10)
        counts = MemoryFeedCounts()

        async with running(
            producer(
                store=store,
                lease=LocalLease(),
                inbox=inbox,
                catalog=catalog,
                broker=broker,
                counts=counts,
            )
        ):

            async def counted() -> bool:
                return (await counts.read()).get("rejected|ingest|inactive_symbol") == 1

            await eventually(counted)
            aapl = await store.read_history("AAPL", since=0, limit=10)

        assert [t.as_dict()["price"] for t in aapl] == ["190.1", "190.2"]
        assert await store.read_history("MSFT", since=0, limit=10) == []


class TestMemoryInbox:
    async def test_waits_for_room_then_refuses(self) -> None:
        inbox = MemoryInbox(max_pending=1, wait_seconds=0.05)
        first = await inbox.push([Quote("AAPL", Decimal("1"))])

        with pytest.raises(InboxFull):
            await inbox.push([Quote("AAPL", Decimal("2"))])
        waiting = asyncio.create_task(inbox.push([Quote("AAPL", Decimal("3"))]))
        await asyncio.sleep(0)
        await inbox.ack([first])

        assert await waiting != first
