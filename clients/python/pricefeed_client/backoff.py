"""Reconnect delays: exponential and capped, with jitter so that clients dropped together
do not all return at the same moment."""

from __future__ import annotations

import random


class Backoff:
    """Each delay is drawn between half and all of the step ("equal jitter"), which doubles
    from `first` up to `cap` until `reset()` (after a connection that worked)."""

    def __init__(self, *, first: float = 0.5, cap: float = 15.0) -> None:
        if not 0 < first <= cap:
            raise ValueError("Backoff needs 0 < first <= cap")
        self.first, self.cap = first, cap
        self._step = first

    def reset(self) -> None:
        self._step = self.first

    def next_delay(self) -> float:
        step = self._step
        self._step = min(self.cap, step * 2)
        return step / 2 + random.random() * step / 2
