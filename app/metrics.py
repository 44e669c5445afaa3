"""Prometheus metrics: what operators watch. Served at /metrics.

What the fan-out bumps for every tick or burst is a `LoopCounter` or `LoopHistogram`: a plain
number, updated from the event loop's thread only and read when /metrics is scraped.
prometheus_client's own take a lock and walk several Python calls per update, which measured
~27 µs of server CPU per tick on the fan-out's cold path (docs/performance.md).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector


class LoopCounter(Collector):
    """A counter for the event loop's thread: `inc` is one addition."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name, self.documentation = name, documentation
        self.value = 0
        REGISTRY.register(self)

    def inc(self, amount: int = 1) -> None:
        self.value += amount

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.value)


class LoopHistogram(Collector):
    """A histogram for the event loop's thread: `observe` is a bisect and two additions."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last: above every bound (+Inf only)
        self.sum = 0.0
        REGISTRY.register(self)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def collect(self) -> Iterator[Metric]:
        cumulative, buckets = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        yield HistogramMetricFamily(
            self.name, self.documentation, buckets=buckets, sum_value=self.sum
        )


CONNECTIONS = Gauge("pricefeed_connections", "Open streaming connections", ["transport"])
SUBSCRIPTIONS = Gauge("pricefeed_subscriptions", "Symbol subscriptions across open connections")
LANE_MEMBERS = Gauge(
    "pricefeed_fanout_lane_members",
    "Subscriptions on the fan-out fast path (one-symbol streams that keep up)",
)
TICKS_PUBLISHED = Counter("pricefeed_ticks_published_total", "Ticks published by this producer")
TICKS_RECEIVED = LoopCounter("pricefeed_ticks_received", "Ticks this instance got from the broker")
MESSAGES_SENT = LoopCounter("pricefeed_messages_sent", "Frames sent to stream clients")
CONFLATED = Counter(
    "pricefeed_ticks_conflated_total", "Ticks dropped for a slow reader (latest wins)"
)
HUB_SKIPPED = LoopCounter(
    "pricefeed_hub_ticks_skipped", "Stale ticks skipped while the fan-out was behind"
)
HUB_BACKLOG_DROPPED = Counter(
    "pricefeed_hub_backlog_dropped_total",
    "Ticks that overflowed the backlog held during a gap refetch (refetched in turn)",
)
CLOSES = Counter("pricefeed_closes_total", "Streams closed by the server", ["code"])
GAPS_REPAIRED = Counter(
    "pricefeed_gap_ticks_repaired_total", "Ticks refetched from the store after a broker gap"
)
RESETS = Counter(
    "pricefeed_stream_resets_total",
    "Snapshots marked reset: a feed started afresh after ticks stored nowhere, or a seq that"
    " went back; `where`: live (the hub) or resume (a since resume)",
    ["where"],
)
BROKER_CONNECTED = Gauge("pricefeed_broker_connected", "1 while the broker subscription is live")
BROKER_RECONNECTS = Counter("pricefeed_broker_reconnects_total", "Broker subscription reconnects")
BROKER_DROPPED = Counter("pricefeed_broker_dropped_total", "Broker messages dropped", ["reason"])
PRODUCER_LEADER = Gauge(
    "pricefeed_producer_leader", "1 while this instance holds the producer lease"
)
REFUSED = Counter(
    "pricefeed_requests_refused_total",
    "Requests refused by a limit: rest, token-address, token-client (429), token-checks (503),"
    " replay (a since resume answered with a snapshot)",
    ["limit"],
)
TASK_FAILURES = Counter("pricefeed_task_failures_total", "Background task failures", ["task"])
FANOUT_LAG = LoopHistogram(
    "pricefeed_fanout_lag_seconds",
    "Age of a tick (producer ts to now) when the hub passes it on: how far behind fan-out is",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)


class FeedCollector(Collector):
    """The feed's counts (app/feed/stats.py, read from where the producer adds them when
    /metrics is scraped) and the age of the newest tick this instance passed on."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.last_tick_age: Callable[[], float | None] = lambda: None
        REGISTRY.register(self)

    def collect(self) -> Iterator[Metric]:
        rejected = CounterMetricFamily(
            "pricefeed_feed_rejected",
            "Source records skipped (bad replay rows, malformed upstream messages), cluster-wide",
            labels=["source", "reason"],
        )
        gaps = CounterMetricFamily(
            "pricefeed_feed_upstream_gaps",
            "Gaps in an upstream's own sequence numbers, cluster-wide",
            labels=["source"],
        )
        for field, value in sorted(self.counts.items()):
            kind, *labels = field.split("|")
            if kind == "rejected" and len(labels) == 2:
                rejected.add_metric(labels, value)
            elif kind == "gaps" and len(labels) == 1:
                gaps.add_metric(labels, value)
        yield rejected
        yield gaps
        age = self.last_tick_age()
        yield GaugeMetricFamily(
            "pricefeed_feed_last_tick_age_seconds",
            "Seconds since this instance last passed on a tick (NaN: none yet)",
            value=float("nan") if age is None else age,
        )


FEED = FeedCollector()


class HistoryCollector(Collector):
    """The history writer's state (app/history/status.py), read from where the leader's
    producer reports it when /metrics is scraped: every instance exports the same numbers."""

    def __init__(self) -> None:
        self.lag_seconds: float | None = None  # None: no writer has reported
        self.dropped = 0
        REGISTRY.register(self)

    def collect(self) -> Iterator[Metric]:
        lag = self.lag_seconds
        yield GaugeMetricFamily(
            "pricefeed_history_write_lag_seconds",
            "Age of the oldest published tick not yet written to the database (NaN: no writer)",
            value=float("nan") if lag is None else lag,
        )
        yield CounterMetricFamily(
            "pricefeed_history_dropped",
            "Published ticks dropped from the history writer's full buffer, cluster-wide",
            value=self.dropped,
        )


HISTORY = HistoryCollector()
