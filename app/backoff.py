"""Retry delays: exponential, capped, with jitter, for every reconnect and restart loop.

Without jitter every instance that lost Redis at the same moment retries at the same moments,
and a restarted Redis meets the whole cluster at once, again and again. Each delay here is
drawn between half and all of the exponential step ("equal jitter"), so retries spread out
while a delay never collapses to zero."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable


class Backoff:
    """`await backoff.sleep()` between attempts; `reset()` after one that worked.

    Delays grow from `base` by `factor` up to `cap`. An attempt that ran longer than
    `healthy_after` seconds before failing counts as a success first (`sleep(ran_for=…)`),
    so a task that fails once a day does not wait the cap."""

    __slots__ = ("base", "cap", "factor", "healthy_after", "_attempt", "_step", "_random")

    def __init__(
        self,
        *,
        base: float = 0.5,
        cap: float = 10.0,
        factor: float = 2.0,
        healthy_after: float = 60.0,
        rng: Callable[[], float] = random.random,
    ) -> None:
        # Written so that NaN fails too; an infinite cap would one day sleep forever, and
        # healthy_after <= 0 would reset before every delay (never growing).
        if not (0 < base <= cap < math.inf and factor >= 1 and healthy_after > 0):
            raise ValueError(
                "Backoff needs 0 < base <= cap < inf, factor >= 1 and healthy_after > 0"
            )
        self.base = base
        self.cap = cap
        self.factor = factor
        self.healthy_after = healthy_after
        self._attempt = 0
        # The step itself, not base * factor**attempt: that power overflows (OverflowError)
        # after ~1000 failures in a row, a few hours of a dependency being down.
        self._step = base
        self._random = rng

    @property
    def attempt(self) -> int:
        """Failures since the last reset."""
        return self._attempt

    def reset(self) -> None:
        self._attempt = 0
        self._step = self.base

    def next_delay(self, *, ran_for: float = 0.0) -> float:
        """The delay before the next attempt; counts this failure."""
        if ran_for >= self.healthy_after:
            self.reset()
        step = self._step
        self._step = min(self.cap, step * self.factor)
        self._attempt += 1
        return step / 2 + self._random() * step / 2

    async def sleep(self, *, ran_for: float = 0.0) -> float:
        """Wait the next delay; returns it (for a log line)."""
        delay = self.next_delay(ran_for=ran_for)
        await asyncio.sleep(delay)
        return delay
