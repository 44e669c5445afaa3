"""The hub: subscriptions (attach, detach), what a stream gets across them, and how it goes on
after a failure."""

from __future__ import annotations

import asyncio

import pytest

from app.broker import Broker, price_channel
from app.errors import UnknownSymbol
from app.prices.hub import FanoutHub
from app.prices.outbox import Outbox
from app.prices.ticks import Tick
from tests.prices.fanout_support import (
    FakeProtocol,
    SlowStore,
    consuming_hub,
    direct_outbox,
    received,
    tick,
)


class TestFanoutHub:
    async def test_fast_reader_keeps_every_tick_while_slow_one_is_conflated(self) -> None:
        fast, slow = (
            Outbox(limit=32, on_queued=lambda: None),
            Outbox(limit=32, on_queued=lambda: None),
        )
        async with consuming_hub("AAPL", attach_first=[fast, slow]) as fanout:
            seqs: list[int] = []
            for seq in range(1, 501):
                await fanout.send(tick("AAPL", seq))
                if seq % 10 == 0:
                    await asyncio.sleep(0)  # let the hub run
                    seqs += [f.seq for f in fast.drain()]
            assert await received(fast, 500, so_far=seqs) == list(range(1, 501))
            slow_seqs = [f.seq for f in slow.drain()]
            assert len(slow_seqs) <= 32
            assert slow_seqs[-1] == 500
            assert slow.conflated > 0

    async def test_every_stream_goes_on_after_a_failure_mid_flush(self) -> None:
        async with consuming_hub("MSFT", "AAPL") as fanout:
            hub = fanout.hub
            await fanout.publish("MSFT", [1])
            await fanout.publish("AAPL", [1])
            protocols = [FakeProtocol(), FakeProtocol()]
            for protocol in protocols:  # watchlists: the corked path, one write per burst
                outbox = direct_outbox(protocol)
                await hub.attach(outbox, "MSFT", since=None, subject="tester")
                await hub.attach(outbox, "AAPL", since=None, subject="tester")
            await fanout.publish("MSFT", [2])
            join_lane, calls = hub.lanes.join, []

            def fails_once(outbox: Outbox, now: float) -> None:
                calls.append(outbox)
                if len(calls) == 1:
                    raise RuntimeError("a bug")
                join_lane(outbox, now)

            hub.lanes.join = fails_once  # type: ignore[method-assign]
            await fanout.publish("MSFT", [3])
            await fanout.restart()  # what the supervisor does
            await fanout.publish("MSFT", range(4, 10))
            for protocol in protocols:
                assert [s for s in protocol.transport.seqs() if s > 1] == list(range(2, 10))

    async def test_a_failure_in_the_hub_ends_consume_for_its_supervisor(self, monkeypatch) -> None:
        async with consuming_hub("MSFT") as fanout:
            with monkeypatch.context() as patch:
                patch.setattr(fanout.hub.sequencer, "deliver", lambda *a: 1 / 0)
                await fanout.produce("MSFT", [1])
                with pytest.raises(ZeroDivisionError):
                    await asyncio.wait_for(fanout.consumer, 5)
            await fanout.restart()  # what the supervisor does
            outbox = Outbox(limit=64, on_queued=lambda: None)
            await fanout.hub.attach(outbox, "MSFT", since=None, subject="tester")
            await fanout.produce("MSFT", [2, 3])
            assert await received(outbox, 3) == [1, 2, 3]  # 1: the snapshot

    async def test_what_a_failing_offer_left_undelivered_is_refetched(self) -> None:
        """A bug while a burst is offered ends `consume`; the burst's later ticks were never
        passed on, so after the restart they are refetched from the store, not skipped."""

        class FailsOnce(Outbox):
            failed = False

            def offer(self, tick: Tick, wire: bytes) -> bool:
                if tick.seq == 3 and not self.failed:
                    self.failed = True
                    raise RuntimeError("a bug")
                return super().offer(tick, wire)

        outbox = FailsOnce(limit=64, on_queued=lambda: None)
        async with consuming_hub("MSFT") as fanout:
            await fanout.produce("MSFT", [1])
            await fanout.hub.attach(outbox, "MSFT", since=None, subject="tester")
            await fanout.send(tick("MSFT", 2), tick("MSFT", 3), tick("MSFT", 4))  # one burst
            with pytest.raises(RuntimeError):
                await asyncio.wait_for(fanout.consumer, 5)
            await fanout.restart()  # what the supervisor does
            await fanout.produce("MSFT", [5])
            # 3 failed on its way to this outbox (a seq jump it sees); 4 is refetched
            assert await received(outbox, 5) == [1, 2, 4, 5]


class TestAttach:
    async def test_a_stream_closed_while_its_snapshot_loads_is_not_left_attached(self) -> None:
        store = SlowStore(retention=100, candles_kept=10)
        await store.append(tick("AAPL", 1), {}, fence=None)
        hub = FanoutHub(broker=Broker("memory://"), store=store, retention=100)
        await hub.follow(["AAPL", "MSFT"])
        outbox = Outbox(limit=16, on_queued=lambda: None)
        loading = asyncio.create_task(hub.attach(outbox, "AAPL", since=None, subject="tester"))
        await asyncio.sleep(0.02)
        outbox.closed = True  # what WebSocketStream.close does
        hub.detach(outbox, outbox.symbols)
        await loading
        assert hub.subscription_count == 0
        await hub.attach(
            outbox, "MSFT", since=None, subject="tester"
        )  # and a closed outbox is never attached
        assert hub.subscription_count == 0

    async def test_resume_ahead_of_this_hub_replays_nothing_twice(self) -> None:
        """The client came from a faster instance: its `since` is past what this hub passed
        on, but not past the store. No old snapshot, no duplicate."""
        async with consuming_hub("AAPL", retention=100) as fanout:
            await fanout.send(tick("AAPL", 1))
            await asyncio.sleep(0.02)  # the hub has passed on seq 1
            for seq in range(2, 6):  # in the store, not yet through this hub
                await fanout.store.append(tick("AAPL", seq), {}, fence=None)
            outbox = Outbox(limit=16, on_queued=lambda: None)
            await fanout.hub.attach(outbox, "AAPL", since=4, subject="tester")
            for seq in range(2, 6):  # through the broker now, and then a new one
                await fanout.broker.publish(price_channel("AAPL"), tick("AAPL", seq).frame)
            await fanout.send(tick("AAPL", 6))
            for _ in range(50):
                await asyncio.sleep(0.01)
                if len(outbox) >= 2:
                    break
            assert [(f.event, f.seq) for f in outbox.drain()] == [("replay", 5), ("tick", 6)]


class TestFollow:
    """Instruments added and disabled while the hub runs (app/instruments/watcher.py)."""

    async def test_a_symbol_followed_while_consuming_flows_and_the_others_miss_nothing(
        self,
    ) -> None:
        watching = Outbox(limit=1024, on_queued=lambda: None)
        async with consuming_hub("AAPL", attach_first=[watching]) as fanout:
            hub = fanout.hub
            await fanout.publish("AAPL", range(1, 11))
            following = asyncio.create_task(hub.follow(["XRP-USD"]))
            await fanout.publish("AAPL", range(11, 21))  # while XRP-USD is subscribed
            await following
            assert hub.symbols == ["AAPL", "XRP-USD"]
            newcomer = Outbox(limit=64, on_queued=lambda: None)
            await fanout.publish("XRP-USD", [1])
            await hub.attach(newcomer, "XRP-USD", since=None, subject="tester")
            await fanout.publish("XRP-USD", range(2, 6))
            await fanout.publish("AAPL", range(21, 31))
            assert await received(newcomer, 5) == [1, 2, 3, 4, 5]  # snapshot 1, then live
            assert await received(watching, 30) == list(range(1, 31))

    async def test_an_unfollowed_symbol_stops_and_is_refused_and_the_others_go_on(
        self,
    ) -> None:
        watching = Outbox(limit=1024, on_queued=lambda: None)
        async with consuming_hub("AAPL", "XRP-USD", attach_first=[watching]) as fanout:
            hub = fanout.hub
            await fanout.publish("AAPL", range(1, 6))
            await fanout.publish("XRP-USD", range(1, 6))
            seqs = [(f.symbol, f.seq) for f in watching.drain()]
            await hub.unfollow(["XRP-USD"])
            assert hub.symbols == ["AAPL"]
            await fanout.publish("XRP-USD", range(6, 9))
            await fanout.publish("AAPL", range(6, 11))
            seqs += [(f.symbol, f.seq) for f in watching.drain()]
            assert [s for sym, s in seqs if sym == "AAPL"] == list(range(1, 11))
            assert [s for sym, s in seqs if sym == "XRP-USD"] == list(range(1, 6))
            with pytest.raises(UnknownSymbol):
                await hub.attach(
                    Outbox(limit=16, on_queued=lambda: None),
                    "XRP-USD",
                    since=None,
                    subject="tester",
                )

            await hub.follow(["XRP-USD"])  # re-activated: it goes on from its seq
            await fanout.publish("XRP-USD", range(9, 12))
            again = Outbox(limit=16, on_queued=lambda: None)
            await hub.attach(again, "XRP-USD", since=None, subject="tester")
            await fanout.publish("XRP-USD", [12])
            assert await received(again, 12) == [11, 12]

    async def test_symbols_followed_between_two_runs_of_consume_are_taken_up(self) -> None:
        async with consuming_hub("AAPL") as fanout:
            hub = fanout.hub
            fanout.consumer.cancel()
            await asyncio.gather(fanout.consumer, return_exceptions=True)
            await hub.follow(["XRP-USD"])  # nothing consumes: the next run subscribes it
            await hub.unfollow(["AAPL"])
            await fanout.restart()
            outbox = Outbox(limit=16, on_queued=lambda: None)
            await fanout.publish("XRP-USD", [1])
            await hub.attach(outbox, "XRP-USD", since=None, subject="tester")
            await fanout.publish("XRP-USD", [2, 3])
            assert await received(outbox, 3) == [1, 2, 3]
            assert hub.sequencer.channels == [price_channel("XRP-USD")]
