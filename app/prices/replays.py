"""The replay budget: how many retained ticks `since` resumes may cost a token subject.

A resume (`?since=` on the one-symbol WebSocket, `"since"` on `/v1/ws`, `Last-Event-ID` on
SSE) reads the ticks after `since` from the store and, beyond its window, the database
(app/history/service.py), and writes each tick again: a client looping subscribe `since: 0` /
unsubscribe on many connections once took a core and slowed every other subscriber. So each
resume is priced, before anything is read, at the ticks it would replay (the symbol's latest
seq minus `since`), and:

- one resume may cost at most `per_subscribe` ticks (`WS_REPLAY_TICKS_PER_SUBSCRIBE`);
- a token subject's resumes may cost `per_minute` ticks a minute (`WS_REPLAY_TICKS_PER_MINUTE`),
  a token bucket of that size refilling continuously, kept in this process: each instance
  grants a subject its own budget (a subject spread over n instances may replay n times that).

Past either, the client gets a `snapshot` instead of the replay: a `seq` jump it can fill
from `GET /v1/prices/{symbol}/history?since=…`, at REST rates. Refusals are counted in
`pricefeed_requests_refused_total{limit="replay"}`.
"""

from __future__ import annotations

import time

from app import metrics


class ReplayBudget:
    """Per token subject, a bucket of replayable ticks. Idle buckets (full again by now) are
    swept once there are many, so a stream of one-off subjects holds no memory."""

    _SWEEP_ABOVE = 10_000

    def __init__(self, *, per_subscribe: int = 1000, per_minute: int = 20_000) -> None:
        self.per_subscribe = per_subscribe
        self.per_minute = per_minute
        self._buckets: dict[str, tuple[float, float]] = {}  # subject -> (ticks, at monotonic)

    def take(self, subject: str, ticks: int) -> bool:
        """Whether `subject` may replay `ticks` ticks now (then they are spent); if not, the
        caller sends a snapshot, and nothing is spent."""
        if ticks <= 0:
            return True
        if ticks > self.per_subscribe:
            metrics.REFUSED.labels(limit="replay").inc()
            return False
        now = time.monotonic()
        rate = self.per_minute / 60.0
        if subject not in self._buckets and len(self._buckets) >= self._SWEEP_ABOVE:
            self._sweep(now, rate)
        left, at = self._buckets.get(subject, (float(self.per_minute), now))
        left = min(float(self.per_minute), left + (now - at) * rate)
        if left < ticks:
            self._buckets[subject] = (left, now)
            metrics.REFUSED.labels(limit="replay").inc()
            return False
        self._buckets[subject] = (left - ticks, now)
        return True

    def _sweep(self, now: float, rate: float) -> None:
        full = [
            subject
            for subject, (left, at) in self._buckets.items()
            if left + (now - at) * rate >= self.per_minute
        ]
        for subject in full:
            del self._buckets[subject]
