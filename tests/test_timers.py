"""app/timers.py: the timer wheel behind every idle connection's heartbeats, deadlines and
keepalive pings."""

from __future__ import annotations

import asyncio

from app.timers import RESOLUTION, coarse_timers


async def _wait_for(fired: list[object], count: int, timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while len(fired) < count:
            await asyncio.sleep(0.01)


class TestTimerWheel:
    async def test_each_timer_fires_once_in_order_and_not_early(self) -> None:
        loop = asyncio.get_running_loop()
        wheel = coarse_timers()
        fired: list[tuple[str, float, float]] = []
        start = loop.time()
        for name, delay in (("late", 0.45), ("soon", 0.15), ("now", 0.0), ("mid", 0.3)):
            wheel.call_later(delay, lambda n=name, d=delay: fired.append((n, d, loop.time())))
        await _wait_for(fired, 4)
        await asyncio.sleep(2 * RESOLUTION)
        assert [name for name, _, _ in fired] == ["now", "soon", "mid", "late"]
        # give or take the loop clock's millisecond
        assert all(at - start >= delay - 0.002 for _, delay, at in fired)

    async def test_a_cancelled_timer_does_not_fire(self) -> None:
        wheel = coarse_timers()
        fired: list[str] = []
        doomed = wheel.call_later(0.05, lambda: fired.append("doomed"))
        wheel.call_later(0.1, lambda: fired.append("kept"))
        doomed.cancel()
        assert doomed.cancelled()
        await _wait_for(fired, 1)
        await asyncio.sleep(2 * RESOLUTION)
        assert fired == ["kept"]

    async def test_a_failing_callback_is_reported_and_the_rest_still_fire(self) -> None:
        loop = asyncio.get_running_loop()
        reported: list[BaseException] = []
        loop.set_exception_handler(lambda _, context: reported.append(context["exception"]))
        fired: list[str] = []

        def fail() -> None:
            raise RuntimeError("boom")

        wheel = coarse_timers()
        wheel.call_later(0.0, fail)
        wheel.call_later(0.0, lambda: fired.append("after"))
        wheel.call_later(0.2, lambda: fired.append("later"))
        await _wait_for(fired, 2)
        assert fired == ["after", "later"]
        assert [str(exc) for exc in reported] == ["boom"]

    async def test_a_timer_scheduled_from_a_callback_fires(self) -> None:
        """As a stream re-arms its own timer when it fires."""
        wheel = coarse_timers()
        fired: list[int] = []

        def again() -> None:
            fired.append(len(fired))
            if len(fired) < 3:
                wheel.call_later(0.05, again)

        wheel.call_later(0.0, again)
        await _wait_for(fired, 3)
        assert fired == [0, 1, 2]

    async def test_one_wheel_per_loop(self) -> None:
        wheel = coarse_timers()
        assert coarse_timers() is wheel
        other = await asyncio.to_thread(lambda: asyncio.run(_wheel_of_a_new_loop()))
        assert other is not wheel


async def _wheel_of_a_new_loop() -> object:
    return coarse_timers()
