"""Prometheus metrics: what operators watch. Served at /metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CONNECTIONS = Gauge("pricefeed_connections", "Open streaming connections", ["transport"])
SUBSCRIPTIONS = Gauge("pricefeed_subscriptions", "Symbol subscriptions across open connections")
LANE_MEMBERS = Gauge(
    "pricefeed_fanout_lane_members",
    "Subscriptions on the fan-out fast path (one-symbol streams that keep up)",
)
TICKS_PUBLISHED = Counter("pricefeed_ticks_published_total", "Ticks published by this producer")
TICKS_RECEIVED = Counter(
    "pricefeed_ticks_received_total", "Ticks this instance got from the broker"
)
MESSAGES_SENT = Counter("pricefeed_messages_sent_total", "Frames sent to stream clients")
CONFLATED = Counter(
    "pricefeed_ticks_conflated_total", "Ticks dropped for a slow reader (latest wins)"
)
HUB_SKIPPED = Counter(
    "pricefeed_hub_ticks_skipped_total", "Stale ticks skipped while the fan-out was behind"
)
CLOSES = Counter("pricefeed_closes_total", "Streams closed by the server", ["code"])
GAPS_REPAIRED = Counter(
    "pricefeed_gap_ticks_repaired_total", "Ticks refetched from the store after a broker gap"
)
BROKER_CONNECTED = Gauge("pricefeed_broker_connected", "1 while the broker subscription is live")
BROKER_RECONNECTS = Counter("pricefeed_broker_reconnects_total", "Broker subscription reconnects")
BROKER_DROPPED = Counter("pricefeed_broker_dropped_total", "Broker messages dropped", ["reason"])
PRODUCER_LEADER = Gauge(
    "pricefeed_producer_leader", "1 while this instance holds the producer lease"
)
TASK_FAILURES = Counter("pricefeed_task_failures_total", "Background task failures", ["task"])
FANOUT_LAG = Histogram(
    "pricefeed_fanout_lag_seconds",
    "Age of a tick (producer ts to now) when the hub passes it on: how far behind fan-out is",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
