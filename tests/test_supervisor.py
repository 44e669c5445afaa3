"""app/supervisor.py: a background task that fails is restarted, later each time up to a cap,
from the start again once it ran long enough, and its failures are counted and reported."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from prometheus_client import REGISTRY

from app.backoff import Backoff
from app.supervisor import Supervisor, restart_backoff

SLACK = 0.005  # the loop's clock may fire a timer this early


class Flaky:
    """A task factory that fails every time it is started, after running `runs[i]` seconds;
    records when each run started and ended."""

    def __init__(self, runs: list[float], *, then_wait: int) -> None:
        self.runs = runs
        self.started: list[float] = []
        self.ended: list[float] = []
        self.reached = asyncio.Event()
        self._then_wait = then_wait

    async def __call__(self) -> None:
        loop = asyncio.get_running_loop()
        self.started.append(loop.time())
        if len(self.started) >= self._then_wait:
            self.reached.set()
            await asyncio.Event().wait()  # stay up until the supervisor stops
        await asyncio.sleep(self.runs[len(self.started) - 1])
        self.ended.append(loop.time())
        raise RuntimeError(f"run {len(self.started)} failed")

    def pauses(self) -> list[float]:
        """How long the supervisor waited after each failure before the next start."""
        return [start - end for end, start in zip(self.ended, self.started[1:], strict=False)]


def steady(**kwargs: float) -> Callable[[], Backoff]:
    """Delays without jitter (always the whole step), so the test can name them."""
    return lambda: Backoff(rng=lambda: 1.0, **kwargs)


async def supervise(supervisor: Supervisor, name: str, task: Flaky) -> None:
    supervisor.spawn(name, task)
    try:
        await asyncio.wait_for(task.reached.wait(), timeout=10)
    finally:
        await supervisor.stop()


async def test_restarts_wait_longer_each_time_up_to_the_cap() -> None:
    task = Flaky([0.0] * 5, then_wait=6)
    supervisor = Supervisor(backoff=steady(base=0.05, cap=0.2, healthy_after=60.0))
    failures = REGISTRY.get_sample_value("pricefeed_task_failures_total", {"task": "flaky-1"})
    await supervise(supervisor, "flaky-1", task)

    pauses = task.pauses()
    assert len(pauses) == 5
    for pause, step in zip(pauses, [0.05, 0.1, 0.2, 0.2, 0.2], strict=True):
        assert pause >= step - SLACK
    assert pauses[-1] < 0.4, "capped: without the cap this pause would be 0.4 s"
    counted = REGISTRY.get_sample_value("pricefeed_task_failures_total", {"task": "flaky-1"})
    assert counted == (failures or 0.0) + 5


async def test_a_task_that_ran_long_enough_restarts_quickly_again() -> None:
    # Three quick failures grow the step to 0.4 s; then a run past healthy_after.
    task = Flaky([0.0, 0.0, 0.0, 0.3], then_wait=5)
    supervisor = Supervisor(backoff=steady(base=0.05, cap=1.0, healthy_after=0.25))
    await supervise(supervisor, "flaky-2", task)

    pauses = task.pauses()
    assert pauses[2] >= 0.2 - SLACK
    assert 0.05 - SLACK <= pauses[3] < 0.4, "back to the first step, not the fourth"


async def test_a_failed_task_is_reported_unhealthy_with_why() -> None:
    task = Flaky([0.0], then_wait=2)
    supervisor = Supervisor(backoff=steady(base=0.01, cap=0.01))
    await supervise(supervisor, "flaky-3", task)

    assert supervisor.unhealthy() == {"flaky-3": "RuntimeError: run 1 failed"}


def test_default_restarts_are_jittered_half_a_second_up_to_ten() -> None:
    """Instances whose task failed together do not restart it together."""
    firsts = {restart_backoff().next_delay() for _ in range(50)}
    assert len(firsts) > 1
    assert all(0.25 <= d <= 0.5 for d in firsts)
    backoff = restart_backoff()
    assert all(5.0 <= d <= 10.0 for d in [backoff.next_delay() for _ in range(10)][6:])
    assert backoff.next_delay(ran_for=60.0) <= 0.5, "a task that ran a minute starts over"


async def test_stop_ends_a_task_that_swallowed_its_cancellation() -> None:
    """On Python 3.11 a TaskGroup failing at the moment of the cancellation can lose it;
    shutdown must still end (the producer's term was such a task: shutdown hung)."""
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed.set()  # and carries on, as if nothing had been asked
        await asyncio.Event().wait()

    supervisor = Supervisor()
    supervisor.spawn("stubborn", stubborn)
    await asyncio.sleep(0)
    await asyncio.wait_for(supervisor.stop(), timeout=10)

    assert swallowed.is_set()
