"""`since` resumes are budgeted per token subject (app/prices/replays.py): a client looping
subscribe `since: 0` / unsubscribe gets snapshots once its budget is spent, instead of the
whole retention window each time, while a resume within budget replays exactly what was
missed, and another subject's resumes are untouched."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
import pytest

from app.prices.replays import ReplayBudget
from tests.prices.test_sse import open_events, wait_for_seq
from tests.support import LiveApp, Stream, open_stream, scrape_sample, token

LiveFactory = Callable[..., AbstractAsyncContextManager[LiveApp]]


async def resume(stream: Stream, since: int) -> dict[str, Any]:
    """Subscribe AAPL from `since`; the first frame of it (a replayed tick or a snapshot)."""
    await stream.send({"op": "subscribe", "symbols": ["AAPL"], "since": {"AAPL": since}})
    await stream.recv_type("subscribed")
    return await stream.recv_type("tick", "snapshot")


async def unsubscribe(stream: Stream) -> None:
    await stream.send({"op": "unsubscribe", "symbols": ["AAPL"]})
    await stream.recv_type("unsubscribed")


async def refused_replays(server: LiveApp) -> float:
    return await scrape_sample(server, 'pricefeed_requests_refused_total{limit="replay"}')


async def test_a_since_0_loop_gets_snapshots_past_its_budget(live: LiveFactory) -> None:
    settings = {
        "feed_ticks_per_second": 50,
        "ws_max_messages_per_second": 1000,
        "ws_replay_ticks_per_minute": 120,  # refills 2 ticks a second: little, in this test
    }
    async with (
        live(**settings) as server,
        open_stream(f"{server.ws}/v1/ws?token={token('looper')}") as looper,
        open_stream(f"{server.ws}/v1/ws?token={token('bystander')}") as bystander,
    ):
        await looper.send({"op": "subscribe", "symbols": ["AAPL"]})
        latest = (await looper.recv_type("snapshot"))["seq"]
        while latest < 30:  # each since-0 replay now costs at least 30 of the 120
            latest = (await looper.recv_type("tick"))["seq"]
        await unsubscribe(looper)
        refused = await refused_replays(server)

        firsts = []
        for _ in range(8):
            firsts.append(await resume(looper, 0))
            await unsubscribe(looper)
        refused = await refused_replays(server) - refused

        # Another subject, within its budget: exactly the ticks it missed, then live ones.
        await bystander.send({"op": "subscribe", "symbols": ["AAPL"]})
        seen = (await bystander.recv_type("snapshot"))["seq"]
        await unsubscribe(bystander)
        first = await resume(bystander, seen - 5)
        rest = [first] + [await bystander.recv_type("tick", "snapshot") for _ in range(9)]

    assert firsts[0] == {**firsts[0], "type": "tick", "seq": 1}, "within budget: a replay"
    replays = sum(f["type"] == "tick" for f in firsts)
    assert 1 <= replays <= 4, [f["type"] for f in firsts]
    assert all(f["type"] == "snapshot" for f in firsts[replays:]), "past it: snapshots only"
    assert refused == 8 - replays
    assert all(f["type"] == "tick" for f in rest)
    assert [f["seq"] for f in rest] == list(range(seen - 4, seen + 6))


async def test_one_resume_longer_than_the_per_subscribe_budget_gets_a_snapshot(
    live: LiveFactory,
) -> None:
    async with (
        live(feed_ticks_per_second=50, ws_replay_ticks_per_subscribe=50) as server,
        open_stream(f"{server.ws}/v1/ws?token={token()}") as stream,
    ):
        await stream.send({"op": "subscribe", "symbols": ["AAPL"]})
        latest = (await stream.recv_type("snapshot"))["seq"]
        while latest < 60:
            latest = (await stream.recv_type("tick"))["seq"]
        await unsubscribe(stream)
        near = await resume(stream, latest)  # what it missed since: a few ticks, within 50
        await unsubscribe(stream)
        too_far = await resume(stream, 0)  # 60 ticks and more

    assert too_far["type"] == "snapshot"
    assert (near["type"], near["seq"]) == ("tick", latest + 1)


async def test_every_resume_route_is_budgeted(live: LiveFactory) -> None:
    """The one-symbol WebSocket's `?since=` and SSE's `Last-Event-ID` too: past the budget,
    the first frame is a snapshot."""
    async with (
        live(feed_ticks_per_second=50, ws_replay_ticks_per_subscribe=10) as server,
        httpx.AsyncClient(base_url=server.http, timeout=5) as http,
    ):
        await wait_for_seq(http, "AAPL", 20)
        url = f"{server.ws}/v1/ws/prices/AAPL?token={token()}&since=1"
        async with open_stream(url) as stream:
            one_symbol = await stream.recv_type("tick", "snapshot")
        headers = {"Last-Event-ID": "AAPL:1"}
        async with open_events(http, {"symbols": "AAPL", "token": token()}, headers) as events:
            sse = await events.next()

    assert one_symbol["type"] == "snapshot"
    assert sse.event == "snapshot"


class TestReplayBudget:
    """The bucket alone."""

    def test_refills_at_its_rate_per_subject(self, monkeypatch: pytest.MonkeyPatch) -> None:
        now = [1000.0]
        monkeypatch.setattr("app.prices.replays.time.monotonic", lambda: now[0])
        budget = ReplayBudget(per_subscribe=100, per_minute=120)  # 2 ticks a second
        assert budget.take("a", 100) and budget.take("a", 20)
        assert not budget.take("a", 1), "spent"
        assert budget.take("b", 100), "another subject has its own"
        now[0] += 5  # 10 ticks back
        assert not budget.take("a", 11)
        assert budget.take("a", 10)
        assert not budget.take("a", 101) and budget.take("a", 0)

    def test_idle_subjects_are_swept(self, monkeypatch: pytest.MonkeyPatch) -> None:
        now = [1000.0]
        monkeypatch.setattr("app.prices.replays.time.monotonic", lambda: now[0])
        monkeypatch.setattr(ReplayBudget, "_SWEEP_ABOVE", 3)
        budget = ReplayBudget(per_subscribe=10, per_minute=60)
        for subject in "abc":
            budget.take(subject, 10)
        now[0] += 10  # full again
        budget.take("d", 10)
        assert len(budget._buckets) == 1
