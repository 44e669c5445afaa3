"""app/feed/producer.py with app/feed/stamping.py, on a real Redis through the lean write
connection: batches are stamped and their writes sent while earlier writes are in Redis, yet a
batch whose fenced write is refused is never published, nothing after a failed batch goes out
in that term, no seq is stamped twice across the lease changing hands mid-flight, and every
published tick goes out once, in seq order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Iterable, Sequence
from decimal import Decimal
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from app.broker import Broker, price_channel
from app.feed.producer import Producer
from app.feed.sources import Quote
from app.instruments.catalog import Catalog
from app.instruments.repository import InstrumentInfo
from app.prices.store import Chain, EarlierWriteMissing, NotLeader, RedisTickStore, Run
from app.prices.ticks import decode_tick, encode_tick
from app.redis_commands import CommandConnection
from tests.feed.test_producer_order import OneBatch
from tests.support import RedisServer

pytestmark = pytest.mark.redis

AAPL = InstrumentInfo("AAPL", "Apple", "equity", 2, Decimal("190.00"))
MSFT = InstrumentInfo("MSFT", "Microsoft", "equity", 2, Decimal("410.00"))


class Fence:
    """A lease that is held as `token` (whether Redis agrees is the store's to check)."""

    renew_interval = 1.0

    def __init__(self, token: str) -> None:
        self.token = token


class LeaseTakenAt(RedisTickStore):
    """Writes on the lean connection; just before its `at`-th write is sent, the lease key is
    handed to a successor on that same connection, so Redis runs the hand-over between two
    writes that are both in flight. Counts how many writes were in flight at once."""

    def __init__(self, redis_client: Redis, *, at: int, timeout: float = 5.0) -> None:
        self.commands = CommandConnection.like(redis_client, timeout=timeout)
        super().__init__(
            redis_client, prefix="t", retention=1000, candles_kept=10, commands=self.commands
        )
        self.at = at
        self.calls = 0
        self.in_flight = 0
        self.most_in_flight = 0

    async def append_runs(
        self, runs: Sequence[Run], *, fence: str | None, chain: Chain | None = None
    ) -> list[int]:
        self._before_write()
        try:
            return await super().append_runs(runs, fence=fence, chain=chain)
        finally:
            self.in_flight -= 1

    async def written(self, outcome: Awaitable[Any]) -> list[int]:
        """A write that publishes its ticks too (`Broker.publish_written`): sent from here."""
        self._before_write()
        try:
            return await super().written(outcome)
        finally:
            self.in_flight -= 1

    def _before_write(self) -> None:
        self.calls += 1
        if self.calls == self.at:
            self.commands.send(("SET", self.leader_key, "successor"))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)


SETTLED = "settled"


class Published:
    """Every frame the broker delivers, in order."""

    def __init__(self) -> None:
        self.seqs: dict[str, list[int]] = {}
        self.settled = asyncio.Event()

    def __call__(self, burst: list[tuple[str, str]]) -> None:
        for _channel, frame in burst:
            if frame == SETTLED:
                self.settled.set()
                continue
            tick = decode_tick(frame)
            self.seqs.setdefault(tick.symbol, []).append(tick.seq)


@pytest.fixture
async def stores(redis_client: Redis) -> AsyncIterator[list[LeaseTakenAt]]:
    made: list[LeaseTakenAt] = []
    yield made
    for store in made:
        await store.close()


@pytest.fixture(params=["memory", "redis"])
async def broker(request: pytest.FixtureRequest, redis: RedisServer) -> AsyncIterator[Broker]:
    """memory://: each batch published after its write answered. Redis: each batch published
    by its write's own script (`Broker.publish_written`)."""
    broker = Broker("memory://" if request.param == "memory" else redis.url)
    await broker.connect()
    yield broker
    await broker.disconnect()


def producer(store: RedisTickStore, broker: Broker, token: str) -> Producer:
    return Producer(
        source=OneBatch([]),
        instruments=Catalog([AAPL, MSFT]),
        store=store,
        broker=broker,
        lease=Fence(token),  # type: ignore[arg-type]
    )


def batch(n: int) -> list[Quote]:
    return [Quote("AAPL", Decimal(f"190.{n:02d}")), Quote("MSFT", Decimal(f"410.{n:02d}"))] * 3


async def emit_together(producer: Producer, numbers: Iterable[int]) -> list[object]:
    """`batch(n)` for each of `numbers`, emitted at once (their writes in flight together):
    each one's outcome, None or what it raised."""
    emits = [asyncio.ensure_future(producer.emit_batch(batch(n))) for n in numbers]
    return await asyncio.gather(*emits, return_exceptions=True)


async def settle(broker: Broker, seen: Published, store: LeaseTakenAt) -> None:
    """Wait until what was published so far is delivered: a marker published behind it (on
    Redis, on the store's write connection, so behind every write sent) has arrived."""
    seen.settled.clear()
    if broker.publishes_written:
        await store.commands.call("PUBLISH", price_channel("AAPL"), SETTLED)
    else:
        await broker.publish_many([(price_channel("AAPL"), SETTLED)])
    await asyncio.wait_for(seen.settled.wait(), 5)


class TestSpeculativeStamping:
    async def test_the_lease_lost_mid_flight_publishes_what_was_written_and_no_seq_twice(
        self, redis_client: Redis, broker: Broker, stores: list[LeaseTakenAt]
    ) -> None:
        store = LeaseTakenAt(redis_client, at=4)
        stores.append(store)
        await redis_client.set(store.leader_key, "first")
        seen = Published()
        channels = [price_channel("AAPL"), price_channel("MSFT")]
        async with broker.subscribe_bursts(channels, seen):
            first = producer(store, broker, "first")
            outcomes = await emit_together(first, range(6))
            assert store.most_in_flight > 1, "writes were sent before earlier ones answered"
            assert outcomes[:3] == [None, None, None]
            assert isinstance(outcomes[3], NotLeader)
            assert all(isinstance(o, Exception) for o in outcomes[3:])
            await settle(broker, seen, store)
            assert seen.seqs == {"AAPL": list(range(1, 10)), "MSFT": list(range(1, 10))}

            successor = producer(store, broker, "successor")
            await successor.emit_batch(batch(9))
            await settle(broker, seen, store)
        stored = await store.read_history("AAPL", since=None, limit=100)
        assert [t.seq for t in stored] == list(range(1, 13)), "no seq stored twice or skipped"
        assert seen.seqs["AAPL"] == list(range(1, 13)), "each once, in order"
        assert seen.seqs["MSFT"] == list(range(1, 13))

    async def test_a_refused_fence_publishes_nothing(
        self, redis_client: Redis, broker: Broker, stores: list[LeaseTakenAt]
    ) -> None:
        store = LeaseTakenAt(redis_client, at=0)
        stores.append(store)
        await redis_client.set(store.leader_key, "someone-else")
        seen = Published()
        async with broker.subscribe_bursts([price_channel("AAPL")], seen):
            stale = producer(store, broker, "me")
            outcomes = await emit_together(stale, range(3))
            await settle(broker, seen, store)
        assert all(isinstance(o, Exception) for o in outcomes)
        assert isinstance(outcomes[0], NotLeader)
        assert seen.seqs == {}
        assert await store.read_latest(["AAPL", "MSFT"]) == {}

    async def test_redis_gone_mid_flight_publishes_nothing_after_it_and_resumes_after_it(
        self, redis: RedisServer, redis_client: Redis, broker: Broker, stores: list[LeaseTakenAt]
    ) -> None:
        store = LeaseTakenAt(redis_client, at=0, timeout=0.3)
        stores.append(store)
        await redis_client.set(store.leader_key, "first")
        seen = Published()
        async with broker.subscribe_bursts([price_channel("AAPL")], seen):
            first = producer(store, broker, "first")
            await first.emit_batch(batch(0))  # seq 1..3
            redis.freeze()  # the next writes are sent, and not answered in time
            try:
                outcomes = await emit_together(first, (1, 2))
            finally:
                redis.thaw()
            assert all(isinstance(o, Exception) for o in outcomes)
            await settle(broker, seen, store)
            ran = (await store.read_latest(["AAPL"]))["AAPL"].seq
            if broker.publishes_written:
                # Redis ran the writes it had read, each publishing its own ticks.
                assert seen.seqs == {"AAPL": list(range(1, ran + 1))}, "each once, in order"
            else:
                assert seen.seqs == {"AAPL": [1, 2, 3]}, "nothing whose write did not answer"
            # A next term takes up after them.
            again = producer(store, broker, "first")
            await again.emit_batch(batch(3))
            await settle(broker, seen, store)
        latest = (await store.read_latest(["AAPL"]))["AAPL"].seq
        stored = [t.seq for t in await store.read_history("AAPL", since=None, limit=100)]
        assert stored == list(range(1, latest + 1)), "no seq stored twice"
        assert latest == ran + 3
        if broker.publishes_written:
            assert seen.seqs["AAPL"] == stored, "no gap, no duplicate"
        else:
            assert seen.seqs["AAPL"] == [1, 2, 3, latest - 2, latest - 1, latest]


class LostBeforeRedis(LeaseTakenAt):
    """Its `lost`-th write never reaches Redis (its connection failed before it was sent),
    while the writes after it go out on the connection opened next."""

    def __init__(self, redis_client: Redis, *, lost: int) -> None:
        super().__init__(redis_client, at=0)
        self.lost = lost
        self.writes = 0

    async def append_runs(
        self, runs: Sequence[Run], *, fence: str | None, chain: Chain | None = None
    ) -> list[int]:
        self.writes += 1
        if self.writes == self.lost:
            raise RedisConnectionError("connection lost before the write was sent")
        return await super().append_runs(runs, fence=fence, chain=chain)

    async def written(self, outcome: Awaitable[Any]) -> list[int]:
        self.writes += 1
        if self.writes == self.lost:
            outcome.close()  # type: ignore[attr-defined]  # never sent
            raise RedisConnectionError("connection lost before the write was sent")
        return await super().written(outcome)


class TestChain:
    async def test_a_write_that_follows_one_never_sent_is_refused_and_nothing_after_it_goes_out(
        self, redis_client: Redis, broker: Broker, stores: list[LeaseTakenAt]
    ) -> None:
        store = LostBeforeRedis(redis_client, lost=2)
        stores.append(store)
        await redis_client.set(store.leader_key, "first")
        seen = Published()
        async with broker.subscribe_bursts([price_channel("AAPL")], seen):
            first = producer(store, broker, "first")
            outcomes = await emit_together(first, range(4))
            assert outcomes[0] is None
            assert isinstance(outcomes[1], RedisConnectionError)
            # Sent behind the lost one: the store refused them (else seq 7.. would be kept,
            # and on Redis published, after a gap at 4..6).
            assert any(isinstance(o, EarlierWriteMissing) for o in outcomes[2:])
            assert all(isinstance(o, Exception) for o in outcomes[2:])
            await settle(broker, seen, store)
            assert seen.seqs == {"AAPL": [1, 2, 3]}
            stored = [t.seq for t in await store.read_history("AAPL", since=None, limit=100)]
            assert stored == [1, 2, 3], "nothing kept behind a gap"

            again = producer(store, broker, "first")  # the next term takes up at seq 4
            await again.emit_batch(batch(4))
            await settle(broker, seen, store)
        stored = [t.seq for t in await store.read_history("AAPL", since=None, limit=100)]
        assert stored == list(range(1, 7))
        assert seen.seqs["AAPL"] == list(range(1, 7)), "no gap, no duplicate"

    async def test_the_store_takes_a_write_only_behind_the_one_it_names(
        self, redis_client: Redis, stores: list[LeaseTakenAt]
    ) -> None:
        store = LeaseTakenAt(redis_client, at=0)
        stores.append(store)
        run = Run("AAPL", [encode_tick(symbol="AAPL", price=Decimal("1.00"), ts=1, seq=1)])
        with pytest.raises(EarlierWriteMissing):
            await store.append_runs([run], fence=None, chain=Chain("b", follows="a"))
        assert await store.read_latest(["AAPL"]) == {}
        await store.append_runs([run], fence=None, chain=Chain("a", follows=None))
        later = Run("AAPL", [encode_tick(symbol="AAPL", price=Decimal("1.01"), ts=2, seq=2)])
        assert await store.append_runs([later], fence=None, chain=Chain("b", follows="a")) == [0]
        assert (await store.read_latest(["AAPL"]))["AAPL"].seq == 2


class Offered:
    """A history writer's `offer`: every tick handed to it, as (symbol, seq). Its database
    holds nothing yet."""

    def __init__(self) -> None:
        self.ticks: list[tuple[str, int]] = []
        self.records = self

    async def read_newest_ticks(self, symbols: list[str]) -> dict[str, Any]:
        return {}

    async def read_newest_candles(self, keys: list[tuple[str, str]]) -> dict[str, Any]:
        return {}

    def offer(self, runs: Sequence[Run]) -> None:
        self.ticks += [(t.symbol, t.seq) for run in runs for t in run.ticks]


def with_history(store: RedisTickStore, broker: Broker) -> tuple[Producer, Offered]:
    """A producer leading as "first" whose published runs go to an `Offered` history."""
    history = Offered()
    made = Producer(
        source=OneBatch([]),
        instruments=Catalog([AAPL, MSFT]),
        store=store,
        broker=broker,
        lease=Fence("first"),  # type: ignore[arg-type]
        history=history,  # type: ignore[arg-type]
    )
    return made, history


async def cancel_mid_flight(producer: Producer, store: LeaseTakenAt, n: int) -> None:
    """Emit `batch(n)` and cancel it once its write is sent (Redis frozen: not answered)."""
    emitting = asyncio.ensure_future(producer.emit_batch(batch(n)))
    while store.in_flight == 0:
        await asyncio.sleep(0.01)
    emitting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await emitting


class TestStopping:
    async def test_a_write_in_flight_when_its_producer_stops_reaches_history(
        self, redis: RedisServer, redis_client: Redis, broker: Broker, stores: list[LeaseTakenAt]
    ) -> None:
        """Redis may publish a batch whose producer was cancelled while it was in flight (a
        graceful stop, a term's end): it is seen through, and what it wrote is offered to
        history before the process writes its last ticks there."""
        store = LeaseTakenAt(redis_client, at=0)
        stores.append(store)
        await redis_client.set(store.leader_key, "first")
        first, history = with_history(store, broker)
        seen = Published()
        async with broker.subscribe_bursts([price_channel("AAPL")], seen):
            await first.emit_batch(batch(0))  # seq 1..3 of each
            redis.freeze()  # the next write is sent, and not answered yet
            try:
                await cancel_mid_flight(first, store, 1)
            finally:
                redis.thaw()
            await asyncio.wait_for(first.settled(), 5)
            await settle(broker, seen, store)
        stored = [t.seq for t in await store.read_history("AAPL", since=None, limit=100)]
        assert stored == [1, 2, 3, 4, 5, 6], "the write went through"
        assert sorted(history.ticks) == [(s, n) for s in ("AAPL", "MSFT") for n in range(1, 7)]
        if broker.publishes_written:
            assert seen.seqs["AAPL"] == stored, "published by the write itself"

    async def test_a_write_redis_does_not_answer_holds_the_stop_a_second_at_most(
        self, redis: RedisServer, redis_client: Redis, stores: list[LeaseTakenAt]
    ) -> None:
        """Seeing a write through must not use up the stop's time: the last flush needs it."""
        store = LeaseTakenAt(redis_client, at=0)
        stores.append(store)
        await redis_client.set(store.leader_key, "first")
        broker = Broker(redis.url)
        await broker.connect()
        first, history = with_history(store, broker)
        try:
            await first.emit_batch(batch(0))
            redis.freeze()
            try:
                await cancel_mid_flight(first, store, 1)
                started = asyncio.get_running_loop().time()
                await first.settled()
                waited = asyncio.get_running_loop().time() - started
            finally:
                redis.thaw()
            assert 0.9 <= waited < 2.5, waited
            assert max(seq for _symbol, seq in history.ticks) == 3, "nothing unanswered offered"
        finally:
            await broker.disconnect()
