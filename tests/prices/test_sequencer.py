"""The sequencer: which ticks go on, in what order. Alone (no broker, no connection: bursts in,
runs of ticks out), then through a hub and its broker, as a stream sees it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY

from app.broker import price_channel
from app.prices.outbox import Outbox
from app.prices.sequencer import Sequencer
from app.prices.store import MemoryTickStore
from app.prices.ticks import Tick
from tests.prices.fanout_support import SlowStore, consuming_hub, received, tick


def message(t: Tick) -> tuple[str, str]:
    """What the broker hands over for `t`: its channel and its text."""
    return price_channel(t.symbol), t.frame


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Runs:
    """A sequencer's `deliver`: every run it was handed."""

    def __init__(self) -> None:
        self.runs: list[list[int]] = []

    def __call__(self, ticks: list[Tick]) -> None:
        self.runs.append([t.seq for t in ticks])

    @property
    def seqs(self) -> list[int]:
        return [seq for run in self.runs for seq in run]

    async def until(self, last: int) -> list[int]:
        for _ in range(300):
            if self.seqs and self.seqs[-1] == last:
                break
            await asyncio.sleep(0.01)
        return self.seqs


class FailingStore(MemoryTickStore):
    async def read_history(self, symbol: str, *, since: int | None, limit: int) -> list[Tick]:
        raise ConnectionError("store down")


@contextlib.asynccontextmanager
async def started(
    store: MemoryTickStore, *symbols: str, max_lag_ms: int = 50
) -> AsyncIterator[tuple[Sequencer, Runs, asyncio.Future[None]]]:
    runs = Runs()
    sequencer = Sequencer(store=store, retention=1000, deliver=runs, max_lag_ms=max_lag_ms)
    failed = sequencer.start(list(symbols))
    try:
        yield sequencer, runs, failed
    finally:
        sequencer.stop()


async def stored(store: MemoryTickStore, seqs: range, symbol: str = "MSFT") -> list[Tick]:
    ticks = [tick(symbol, seq) for seq in seqs]
    for t in ticks:
        await store.append(t, {}, fence=None)
    return ticks


class TestSequencer:
    """No broker, no connection: bursts in, runs of ticks out."""

    async def test_a_gap_is_refetched_and_passed_on_in_order_before_what_follows(self) -> None:
        store = MemoryTickStore(retention=1000, candles_kept=10)
        ticks = await stored(store, range(1, 11))
        async with started(store, "MSFT") as (sequencer, runs, _):
            sequencer.on_burst([message(t) for t in ticks[:3]])
            sequencer.on_burst([message(t) for t in ticks[6:8]])  # 4, 5, 6 lost
            sequencer.on_burst([message(t) for t in ticks[8:]])  # while the refetch runs
            assert await runs.until(10) == list(range(1, 11))
            assert runs.runs[0] == [1, 2, 3], "what came before the gap went at once"
            assert runs.runs[1] == [4, 5, 6, 7], "the refetched ticks, then the one at the gap"

    async def test_a_redelivered_tick_is_passed_on_once(self) -> None:
        store = MemoryTickStore(retention=1000, candles_kept=10)
        ticks = await stored(store, range(1, 4))
        async with started(store, "MSFT") as (sequencer, runs, _):
            sequencer.on_burst([message(t) for t in ticks[:2]])
            sequencer.on_burst([message(t) for t in ticks[1:]])
            assert runs.runs == [[1, 2], [3]]

    async def test_stale_ticks_of_a_burst_are_skipped_and_not_refetched(self) -> None:
        store = SlowStore(retention=1000, candles_kept=10)
        skipped = counter("pricefeed_hub_ticks_skipped_total")
        async with started(store, "TSLA", max_lag_ms=50) as (sequencer, runs, _):
            sequencer.on_burst([message(tick("TSLA", 1, ts=1_000))])
            # One burst: 10 ticks 20 ms apart by their ts; only those within 50 ms of the newest
            sequencer.on_burst(
                [message(tick("TSLA", seq, ts=1_000 + 20 * seq)) for seq in range(2, 12)]
            )
            sequencer.on_burst([message(tick("TSLA", 12, ts=1_240))])  # no gap after the skip
            assert runs.runs == [[1], [9, 10, 11], [12]]
            assert store.history_reads == 0, "a skip is no gap to repair"
        assert counter("pricefeed_hub_ticks_skipped_total") == skipped + 7

    async def test_a_backlog_past_its_bound_is_counted_and_refetched(self, monkeypatch) -> None:
        monkeypatch.setattr("app.prices.sequencer._BACKLOG_TICKS", 5)
        store = MemoryTickStore(retention=1000, candles_kept=10)
        ticks = await stored(store, range(1, 41))
        dropped = counter("pricefeed_hub_backlog_dropped_total")
        async with started(store, "MSFT") as (sequencer, runs, _):
            sequencer.on_burst([message(ticks[0])])  # 2 is lost
            for t in ticks[2:]:  # 3..40, each its own burst, before the refetch runs
                sequencer.on_burst([message(t)])
            # 3..40 waited behind the gap; the backlog keeps 5, so 33 fell out of it.
            assert counter("pricefeed_hub_backlog_dropped_total") == dropped + 33
            assert await runs.until(40) == list(range(1, 41)), "what fell out is refetched"

    async def test_a_malformed_message_is_dropped_and_counted(self) -> None:
        store = MemoryTickStore(retention=1000, candles_kept=10)
        malformed = counter("pricefeed_broker_dropped_total", reason="malformed")
        misplaced = counter("pricefeed_broker_dropped_total", reason="wrong_channel")
        async with started(store, "MSFT") as (sequencer, runs, _):
            channel = price_channel("MSFT")
            sequencer.on_burst(
                [
                    (channel, "not a tick"),
                    (channel, '{"type":"tick","symbol":"MSFT"}'),
                    (channel, tick("AAPL", 1).frame),  # a tick, on another symbol's channel
                    message(tick("MSFT", 1)),
                ]
            )
            assert runs.runs == [[1]]
        assert counter("pricefeed_broker_dropped_total", reason="malformed") == malformed + 2
        assert counter("pricefeed_broker_dropped_total", reason="wrong_channel") == misplaced + 1

    async def test_a_failed_refetch_leaves_a_visible_jump_and_goes_on(self) -> None:
        store = FailingStore(retention=1000, candles_kept=10)
        async with started(store, "MSFT") as (sequencer, runs, failed):
            sequencer.on_burst([message(tick("MSFT", 1))])
            sequencer.on_burst([message(tick("MSFT", 5))])
            sequencer.on_burst([message(tick("MSFT", 6))])
            assert await runs.until(6) == [1, 5, 6]
            assert not failed.done()

    async def test_a_seq_far_ahead_that_the_store_lacks_is_dropped_and_counted(self) -> None:
        store = MemoryTickStore(retention=1000, candles_kept=10)
        ticks = await stored(store, range(1, 6))
        dropped = counter("pricefeed_broker_dropped_total", reason="implausible_seq")
        async with started(store, "MSFT") as (sequencer, runs, failed):
            sequencer.on_burst([message(ticks[0])])
            sequencer.on_burst([message(tick("MSFT", 10**15))])  # forged: never stored
            for t in ticks[1:]:
                sequencer.on_burst([message(t)])
            assert await runs.until(5) == [1, 2, 3, 4, 5], "the symbol goes on, not frozen"
            assert sequencer.last_seq["MSFT"] == 5
            assert not failed.done()
        assert counter("pricefeed_broker_dropped_total", reason="implausible_seq") == dropped + 1

    async def test_a_forged_first_tick_after_start_is_dropped_too(self) -> None:
        store = MemoryTickStore(retention=1000, candles_kept=10)
        ticks = await stored(store, range(1, 4))
        dropped = counter("pricefeed_broker_dropped_total", reason="implausible_seq")
        async with started(store, "MSFT") as (sequencer, runs, _):
            await asyncio.sleep(0.01)  # `start` read the store's latest seqs (at once, here)
            sequencer.on_burst([message(tick("MSFT", 10**15))])  # before any real tick
            for t in ticks:
                sequencer.on_burst([message(t)])
            assert await runs.until(3) == [1, 2, 3]
        assert counter("pricefeed_broker_dropped_total", reason="implausible_seq") == dropped + 1

    async def test_a_forged_seq_skipped_as_stale_does_not_become_the_last_seq(self) -> None:
        store = MemoryTickStore(retention=1000, candles_kept=10)
        ticks = await stored(store, range(1, 4))
        async with started(store, "MSFT", max_lag_ms=50) as (sequencer, runs, _):
            sequencer.on_burst([message(ticks[0])])
            forged = tick("MSFT", 10**15, ts=ticks[0].ts - 1_000)  # old: skipped as stale
            sequencer.on_burst([message(forged), message(ticks[1])])
            sequencer.on_burst([message(ticks[2])])
            assert await runs.until(3) == [1, 2, 3]

    async def test_a_forged_seq_with_a_future_ts_makes_no_real_tick_stale(self) -> None:
        """A forged tick's ts far ahead (`tick`'s default for seq 10**15) in the same read as
        real ticks: they are no older than the newest real one, so none is skipped."""
        store = MemoryTickStore(retention=1000, candles_kept=10)
        ticks = await stored(store, range(1, 5))
        dropped = counter("pricefeed_broker_dropped_total", reason="implausible_seq")
        async with started(store, "MSFT", max_lag_ms=50) as (sequencer, runs, _):
            sequencer.on_burst([message(ticks[0])])
            forged = tick("MSFT", 10**15)
            sequencer.on_burst([message(ticks[1]), message(forged), message(ticks[2])])
            sequencer.on_burst([message(ticks[3])])
            assert await runs.until(4) == [1, 2, 3, 4]
        assert counter("pricefeed_broker_dropped_total", reason="implausible_seq") == dropped + 1

    async def test_a_real_jump_past_the_retention_is_passed_on(self) -> None:
        store = MemoryTickStore(retention=1000, candles_kept=10)
        await stored(store, range(1, 2))
        far = await stored(store, range(5_000, 5_002))  # the store has them: real ticks
        async with started(store, "MSFT") as (sequencer, runs, _):
            sequencer.on_burst([message(tick("MSFT", 1))])
            sequencer.on_burst([message(t) for t in far])
            assert (await runs.until(5_001))[-2:] == [5_000, 5_001]

    async def test_a_failing_deliver_ends_the_run_with_its_error(self) -> None:
        store = MemoryTickStore(retention=1000, candles_kept=10)
        async with started(store, "MSFT") as (sequencer, runs, failed):
            sequencer.deliver = lambda ticks: 1 / 0  # type: ignore[assignment,misc]
            sequencer.on_burst([message(tick("MSFT", 1))])
            with pytest.raises(ZeroDivisionError):
                await failed
            sequencer.deliver = runs
            sequencer.on_burst([message(tick("MSFT", 2))])
            assert runs.runs == [], "nothing more is taken once it failed"


class TestSequencingThroughTheHub:
    async def test_gap_in_the_broker_is_refetched_from_the_store(self) -> None:
        outbox = Outbox(limit=64, on_queued=lambda: None)
        async with consuming_hub("MSFT", attach_first=[outbox]) as fanout:
            for seq in range(1, 11):
                t = tick("MSFT", seq)
                await fanout.store.append(t, {}, fence=None)
                if seq not in (4, 5, 6):  # the broker lost these three
                    await fanout.broker.publish(price_channel("MSFT"), t.frame)
            assert await received(outbox, 10) == list(range(1, 11))

    async def test_a_backlog_is_skipped_to_its_newest_ticks_without_refetching(self) -> None:
        """Behind by a burst: ticks older than max_lag_ms vs the newest are skipped (a seq jump
        the client sees), and the hub does not refetch them as if they were a broker gap."""
        store = MemoryTickStore(retention=1000, candles_kept=10)
        await store.append(tick("TSLA", 1), {}, fence=None)
        outbox = Outbox(limit=64, on_queued=lambda: None)
        # the snapshot (seq 1) is taken before the hub consumes
        async with consuming_hub(
            "TSLA", store=store, max_lag_ms=50, attach_first=[outbox]
        ) as fanout:
            # one burst: 10 ticks, 20 ms apart by their ts
            await fanout.send(
                *(tick("TSLA", seq, ts=1_764_300_000_000 + seq * 20) for seq in range(2, 12))
            )
            assert await received(outbox, 11) == [1, 9, 10, 11]


class TestRefetch:
    """While a broker gap is refetched from the store, later ticks wait behind it."""

    async def test_ticks_that_arrive_during_a_refetch_follow_it_in_order(self) -> None:
        store = SlowStore(retention=1000, candles_kept=10)  # every read takes 0.1 s
        async with consuming_hub("MSFT", store=store) as fanout:
            outbox = Outbox(limit=256, on_queued=lambda: None)
            await fanout.hub.attach(outbox, "MSFT", since=None, subject="tester")
            await fanout.produce("MSFT", [1, 2, 3])
            for seq in (4, 5):  # the broker lost these
                await store.append(tick("MSFT", seq), {}, fence=None)
            for seq in range(6, 31):  # and these come while the refetch waits on the store
                await fanout.produce("MSFT", [seq])
                await asyncio.sleep(0.005)
            assert await received(outbox, 30) == list(range(1, 31))
            assert store.history_reads == 1  # one refetch for the one gap, not one per tick

    async def test_a_backlog_past_its_bound_is_refetched_too(self, monkeypatch) -> None:
        monkeypatch.setattr("app.prices.sequencer._BACKLOG_TICKS", 5)
        dropped = REGISTRY.get_sample_value("pricefeed_hub_backlog_dropped_total") or 0.0
        store = SlowStore(retention=1000, candles_kept=10)  # every read takes 0.1 s
        async with consuming_hub("MSFT", store=store) as fanout:
            outbox = Outbox(limit=256, on_queued=lambda: None)
            await fanout.hub.attach(outbox, "MSFT", since=None, subject="tester")
            await fanout.produce("MSFT", [1])
            await store.append(tick("MSFT", 2), {}, fence=None)  # lost by the broker
            await fanout.produce("MSFT", range(3, 41))  # 38 more during the refetch
            assert await received(outbox, 40) == list(range(1, 41))
        assert (REGISTRY.get_sample_value("pricefeed_hub_backlog_dropped_total") or 0) > dropped

    async def test_ticks_gone_stale_during_a_refetch_are_skipped(self) -> None:
        """Behind by a refetch: what waited behind the gap goes out as one burst, so ticks
        more than max_lag_ms older than their symbol's newest are skipped (a seq jump)."""
        store = SlowStore(retention=1000, candles_kept=10)
        async with consuming_hub("MSFT", store=store, max_lag_ms=50) as fanout:
            outbox = Outbox(limit=256, on_queued=lambda: None)
            await fanout.hub.attach(outbox, "MSFT", since=None, subject="tester")
            start = int(time.time() * 1000)
            first = tick("MSFT", 1, ts=start)
            await store.append(first, {}, fence=None)
            await store.append(tick("MSFT", 2, ts=start + 1), {}, fence=None)
            await fanout.broker.publish(price_channel("MSFT"), first.frame)  # 2 is lost
            await asyncio.sleep(0.02)
            for seq in range(3, 23):  # 10 ms apart by their ts, during the 0.1 s refetch
                await fanout.send(tick("MSFT", seq, ts=start + 10 * seq))
                await asyncio.sleep(0.001)  # each its own burst
            seqs = await received(outbox, 22)
            assert seqs[:3] == [1, 2, 3]  # the refetched tick, and the one at the gap
            assert seqs[-6:] == [17, 18, 19, 20, 21, 22]  # within 50 ms of the newest
            assert len(seqs) == 9  # 4..16 skipped
