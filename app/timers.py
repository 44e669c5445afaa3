"""One timer wheel for the many coarse timers that idle connections keep: heartbeat checks,
token expiry, the subscribe deadline, keepalive pings and their pong deadlines.

Each `loop.call_later` costs ~550 bytes under uvloop (a TimerHandle, a UVTimer and libuv's
timer), and an idle connection kept three of them for hours. Here a timer is one small object
in a list, and the wheel keeps a single loop timer, armed for its earliest slot. A timer fires
at most `RESOLUTION` seconds late, not early (give or take the loop clock's millisecond), in
no particular order within its slot.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Callable

RESOLUTION = 0.1  # seconds: a slot's width


class WheelTimer:
    """One scheduled call; `cancel()` it as a loop TimerHandle."""

    __slots__ = ("callback",)

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback: Callable[[], None] | None = callback

    def cancel(self) -> None:
        self.callback = None  # its slot skips it, and lets go of what it referenced now

    def cancelled(self) -> bool:
        return self.callback is None


class TimerWheel:
    """Coarse timers of one event loop, driven by one loop timer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, resolution: float = RESOLUTION) -> None:
        self.loop = loop
        self._resolution = resolution
        self._slots: dict[int, list[WheelTimer]] = {}
        self._due: list[int] = []  # the slot numbers in `_slots`, a heap
        self._armed: asyncio.TimerHandle | None = None
        self._armed_slot: int | None = None

    def __len__(self) -> int:
        """Timers scheduled, cancelled ones included until their slot comes."""
        return sum(len(timers) for timers in self._slots.values())

    def call_later(self, delay: float, callback: Callable[[], None]) -> WheelTimer:
        """Call `callback` once, `delay` seconds from now or up to a slot later."""
        slot = math.ceil((self.loop.time() + max(delay, 0.0)) / self._resolution)
        timer = WheelTimer(callback)
        timers = self._slots.get(slot)
        if timers is None:
            self._slots[slot] = timers = []
            heapq.heappush(self._due, slot)
        timers.append(timer)
        if self._armed_slot is None or slot < self._armed_slot:
            self._arm(slot)
        return timer

    def _arm(self, slot: int) -> None:
        if self._armed is not None:
            self._armed.cancel()
        self._armed_slot = slot
        self._armed = self.loop.call_at(slot * self._resolution, self._fire)

    def _fire(self) -> None:
        self._armed = self._armed_slot = None
        # The loop may run a timer up to its clock resolution early: a slot due within a
        # millisecond counts as due, so that it is not re-armed for the same instant.
        now = self.loop.time() + 0.001
        due = self._due
        while due and due[0] * self._resolution <= now:
            for timer in self._slots.pop(heapq.heappop(due)):
                callback = timer.callback
                if callback is None:
                    continue
                timer.callback = None
                try:
                    callback()
                except Exception as exc:  # noqa: BLE001 - as the loop reports a timer's error
                    self.loop.call_exception_handler(
                        {"message": "Exception in a wheel timer's callback", "exception": exc}
                    )
        if due:
            self._arm(due[0])


_wheels: dict[asyncio.AbstractEventLoop, TimerWheel] = {}


def coarse_timers() -> TimerWheel:
    """The running loop's wheel (created on first use; those of closed loops are dropped)."""
    loop = asyncio.get_running_loop()
    wheel = _wheels.get(loop)
    if wheel is None:
        for closed in [other for other in _wheels if other.is_closed()]:
            del _wheels[closed]
        _wheels[loop] = wheel = TimerWheel(loop)
    return wheel
