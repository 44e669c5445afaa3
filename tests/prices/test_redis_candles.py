"""The Redis store's candles: the forming candle of each interval in one hash, the closed ones
in a sorted set. Whatever runs it is given, it reads back what the memory store does (which
keeps them all in one list), and it reads a sorted set that still holds the forming candle
as this store wrote it before."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest
from redis.asyncio import Redis

from app.feed.resume import FeedState
from app.feed.sources import Quote
from app.feed.stamping import Stamper
from app.prices.candles import INTERVALS_MS, Candle, fold_prices
from app.prices.store import MemoryTickStore, RedisTickStore, Run
from app.prices.ticks import encode_tick
from app.redis_commands import CommandConnection
from tests.support import RedisServer

T0 = 1_764_300_000_000
KEPT = 5


@pytest.fixture
async def store(redis: RedisServer, redis_client: Redis) -> AsyncIterator[RedisTickStore]:
    """The store on the test's own Redis, writing on its lean connection, as the producer's."""
    made = RedisTickStore(
        redis_client,
        prefix="t",
        retention=100,
        candles_kept=KEPT,
        commands=CommandConnection.like(redis_client),
    )
    yield made
    await made.close()


def runs_of_a_walk(symbol: str, count: int, seed: int) -> list[Run]:
    """`count` runs of one to three ticks; some cross into the next minute, a few the hour."""
    rng = random.Random(seed)
    held: dict[str, Candle] = {}
    price, ts, seq = Decimal("100.00"), T0, 0
    runs = []
    for _ in range(count):
        ticks, states = [], []
        for _ in range(rng.randint(1, 3)):
            ts += rng.choice((0, 500, 20_000, 61_000, 3_600_000 if rng.random() < 0.02 else 0))
            price = max(price + Decimal(rng.randint(-30, 30)).scaleb(-2), Decimal("0.01"))
            seq += 1
            ticks.append(encode_tick(symbol=symbol, price=price, ts=ts, seq=seq))
            for interval, ms in INTERVALS_MS.items():
                before = held.get(interval)
                candle = fold_prices(before, ms, ts, price, price, price, price, Decimal(1))
                if before is not None and before.start != candle.start:
                    states.append((interval, before))  # closed within this run
                held[interval] = candle
        # Per interval, the states the run left, oldest first (as the stamper gives them).
        states += held.items()
        runs.append(Run(symbol, ticks, [(i, Candle.decode(c.encode())) for i, c in states]))
    return runs


async def test_it_reads_back_what_the_memory_store_keeps(
    store: RedisTickStore, redis_client: Redis
) -> None:
    memory = MemoryTickStore(retention=100, candles_kept=KEPT)
    runs = runs_of_a_walk("AAPL", 300, seed=3)
    for n in range(0, len(runs), 7):  # several runs a write, as batches are
        batch = runs[n : n + 7]
        assert await store.append_runs(batch, fence=None) == [0] * len(batch)
        await memory.append_runs(batch, fence=None)
        for interval in INTERVALS_MS:
            for limit in (1, 2, KEPT, KEPT + 3):
                assert await store.read_candles(
                    "AAPL", interval, limit=limit
                ) == await memory.read_candles("AAPL", interval, limit=limit), (
                    f"after run {n + len(batch)}: {interval}, limit {limit}"
                )
    minutes = await store.read_candles("AAPL", "1m", limit=100)
    assert len(minutes) == KEPT, "closed candles trimmed to the ones kept, forming included"
    assert await redis_client.zcard("t:candles:AAPL:1m") == KEPT - 1
    # A replayed run keeps nothing: its stale candle states do not go back either.
    assert await store.append_runs([runs[-1]], fence=None) == [len(runs[-1].ticks)]
    assert await store.read_candles("AAPL", "1m", limit=100) == minutes


async def test_a_sorted_set_holding_the_forming_candle_is_read_and_then_replaced(
    store: RedisTickStore, redis_client: Redis
) -> None:
    """What an earlier release left in Redis: the forming candle in the sorted set."""
    old = [
        Candle(T0 + n * 60_000, Decimal(n), Decimal(n), Decimal(n), Decimal(n), Decimal(1))
        for n in (1, 2, 3)
    ]
    await redis_client.zadd("t:candles:AAPL:1m", {c.encode(): c.start for c in old})
    assert await store.read_candles("AAPL", "1m", limit=10) == old

    forming = Candle(old[-1].start, Decimal(3), Decimal(9), Decimal(3), Decimal(9), Decimal(2))
    tick = encode_tick(symbol="AAPL", price=Decimal(9), ts=old[-1].start + 5, seq=1)
    await store.append_runs([Run("AAPL", [tick], [("1m", forming)])], fence=None)
    assert await store.read_candles("AAPL", "1m", limit=10) == [*old[:2], forming]

    new = Candle(old[-1].start + 60_000, *(Decimal(7),) * 4, Decimal(1))
    tick = encode_tick(symbol="AAPL", price=Decimal(7), ts=new.start, seq=2)
    # The run that starts the next candle carries the one it closed, in its final state.
    await store.append_runs([Run("AAPL", [tick], [("1m", forming), ("1m", new)])], fence=None)
    assert await store.read_candles("AAPL", "1m", limit=10) == [*old[:2], forming, new]
    assert await redis_client.zcard("t:candles:AAPL:1m") == 3, "one member a start"


async def test_the_stamper_hands_over_each_candle_it_closes(
    store: RedisTickStore, redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quote in the next minute closes the last one: its run carries that candle's final
    state before the new one, and the store keeps both."""
    now = [T0 + 59_000]
    monkeypatch.setattr("app.feed.stamping.time.time_ns", lambda: now[0] * 1_000_000)
    state = FeedState()
    stamper = Stamper(state)
    runs = []
    for ts, price in ((T0 + 59_000, "10.00"), (T0 + 59_500, "12.00"), (T0 + 60_100, "11.00")):
        now[0] = ts
        run = stamper.stamp("AAPL", [(Quote("AAPL", Decimal(price)), None)])
        await store.append_runs([run], fence=None)
        state.take_run(run, Decimal(price))
        runs.append(run)
    assert [(i, c.start) for i, c in runs[-1].candles if i == "1m"] == [
        ("1m", T0),
        ("1m", T0 + 60_000),
    ]
    closed, forming = await store.read_candles("AAPL", "1m", limit=10)
    assert (closed.start, closed.open, closed.high, closed.close) == (
        T0,
        Decimal("10.00"),
        Decimal("12.00"),
        Decimal("12.00"),
    )
    assert (forming.start, forming.open) == (T0 + 60_000, Decimal("11.00"))
    assert await redis_client.zcard("t:candles:AAPL:1m") == 1
    assert len(await store.read_candles("AAPL", "1h", limit=10)) == 1


async def test_a_field_holding_a_newline_is_refused_before_anything_is_written(
    store: RedisTickStore, redis_client: Redis
) -> None:
    """A run goes to Redis as one argument, its fields joined by newlines."""
    tick = encode_tick(symbol="AAPL", price=Decimal(1), ts=T0, seq=1)
    with pytest.raises(ValueError, match="newline"):
        await store.append_runs([Run("AAPL", [tick], mark="1-0:\n2")], fence=None)
    assert await store.read_history("AAPL", since=None, limit=10) == []
