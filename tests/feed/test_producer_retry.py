"""app/feed/producer.py's lease loop: a standby polls at the lease's pace (failover stays within
one lease), while failures back off: Redis unreachable, and a leadership that keeps ending at
once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import cast

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from app.broker import Broker
from app.feed.producer import Producer
from app.feed.sources.simulated import SimulatedSource
from app.instruments.catalog import Catalog
from app.instruments.repository import InstrumentInfo
from app.prices.store import TickStore
from app.prices.ticks import Tick

SLACK = 0.005  # the loop's clock may fire a timer this early
AAPL = InstrumentInfo("AAPL", "Apple", "equity", 2, Decimal("190.00"))


class ScriptedLease:
    """acquire() answers from `answer(attempt)` (True, False, or an exception to raise);
    records when each attempt came."""

    token: str | None = None

    def __init__(self, answer: Callable[[int], bool | Exception], *, renew_interval: float):
        self.renew_interval = renew_interval
        self.attempts: list[float] = []
        self.releases = 0
        self._answer = answer

    async def acquire(self) -> bool:
        self.attempts.append(asyncio.get_running_loop().time())
        outcome = self._answer(len(self.attempts))
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def renew(self) -> bool:
        return True

    async def release(self) -> None:
        self.releases += 1

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.attempts, self.attempts[1:], strict=False)]


class FailingStore:
    """A store that answers every read with a Redis error (say, out of memory)."""

    async def read_latest(self, symbols: Sequence[str]) -> dict[str, Tick]:
        raise ResponseError("OOM command not allowed")


async def run_until(lease: ScriptedLease, attempts: int, store: object = None) -> None:
    producer = Producer(
        source=SimulatedSource(ticks_per_second=10, seed=1),
        instruments=Catalog([AAPL]),
        store=cast(TickStore, store or FailingStore()),
        broker=cast(Broker, None),  # never reached: nothing is published
        lease=lease,
    )
    task = asyncio.create_task(producer.run())
    try:
        async with asyncio.timeout(10):
            while len(lease.attempts) < attempts:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_redis_unreachable_backs_off_then_the_standby_polls_at_the_lease_pace() -> None:
    down = RedisConnectionError("Connection refused")
    lease = ScriptedLease(lambda n: down if n <= 3 else False, renew_interval=0.05)
    await run_until(lease, attempts=10)

    gaps = lease.gaps()
    # Unreachable: steps 0.2, 0.4, 0.8 s, each wait at least half its step.
    for gap, step in zip(gaps[:3], [0.2, 0.4, 0.8], strict=True):
        assert gap >= step / 2 - SLACK
    # Reachable again, another instance leads: poll every renew_interval, never longer.
    polls = gaps[3:]
    assert all(gap >= 0.05 - SLACK for gap in polls)
    assert max(polls) < 0.2, f"a standby must not back off: {polls}"


async def test_a_leadership_that_keeps_failing_at_once_backs_off() -> None:
    lease = ScriptedLease(lambda n: True, renew_interval=0.05)
    await run_until(lease, attempts=5)

    gaps = lease.gaps()
    assert lease.releases >= 4, "each failed leadership gives the lease back"
    for gap, step in zip(gaps, [0.05, 0.1, 0.2, 0.4], strict=True):
        assert gap >= step / 2 - SLACK
