"""POST /v1/ingest across real processes: two instances on one real redis-server, each with
its producer (`python -m app` starts it as a child process), FEED_SOURCE=ingest so that only
pushed quotes move prices. Pushed to the instance that does not lead, every quote arrives
exactly once, in order, on both; and with the leader SIGKILLed mid-push, every accepted quote
arrives exactly once, in order, seqs contiguous, on the instance that survives."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import (
    RedisServer,
    ServerProcess,
    Stream,
    open_stream,
    running,
    server_process,
    token,
)

pytestmark = [pytest.mark.redis, pytest.mark.slow]

SYMBOLS = ("AAPL", "MSFT")


async def two_instances(a: ServerProcess, b: ServerProcess) -> tuple[ServerProcess, ServerProcess]:
    """(leader, standby) once both are ready and one of them leads."""
    await asyncio.gather(a.wait_ready(), b.wait_ready())
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        roles = [await producer_role(s) for s in (a, b)]
        if sorted(roles) == ["leader", "standby"]:
            return (a, b) if roles[0] == "leader" else (b, a)
        await asyncio.sleep(0.1)
    raise TimeoutError(f"no single leader: {roles}")


async def producer_role(server: ServerProcess) -> str:
    async with httpx.AsyncClient() as http:
        body = (await http.get(f"{server.http}/readyz", timeout=5)).json()
    role: str = body["checks"]["producer"]
    return role


def producer_pid(server: ServerProcess) -> int:
    """With Redis, the server's producer runs as its child `python -m app.feed`."""
    assert server.process is not None
    pid = server.process.pid
    (child,) = [
        int(c)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for c in (task / "children").read_text().split()
    ]
    assert b"app.feed" in Path(f"/proc/{child}/cmdline").read_bytes()
    return child


@contextlib.asynccontextmanager
async def subscribed(server: ServerProcess, symbol: str) -> AsyncIterator[Stream]:
    # since=0: every retained tick, then the live ones, so none is missed to a race with
    # the subscription.
    url = f"{server.ws}/v1/ws/prices/{symbol}?since=0&token={token('watcher')}"
    async with open_stream(url) as stream:
        yield stream


class Collector:
    """Reads one stream's ticks in the background until told to stop."""

    def __init__(self, stream: Stream) -> None:
        self.ticks: list[dict[str, Any]] = []
        self._stream = stream
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            frame = await self._stream.recv(timeout=3600)
            if frame["type"] in ("tick", "snapshot"):
                self.ticks.append(frame)

    async def until(self, prices: set[str], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not prices <= {t["price"] for t in self.ticks}:
            if time.monotonic() > deadline:
                missing = len(prices - {t["price"] for t in self.ticks})
                seqs = [t["seq"] for t in self.ticks]
                jumps = [(a, b) for a, b in zip(seqs, seqs[1:], strict=False) if b != a + 1]
                raise TimeoutError(
                    f"{missing} accepted quotes never arrived; seq jumps seen: {jumps[:10]}"
                )
            await asyncio.sleep(0.05)

    async def stop(self) -> list[dict[str, Any]]:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        return self.ticks


def feeder() -> dict[str, str]:
    return {"Authorization": f"Bearer {token('feeder', symbols=[], scopes=('publish',))}"}


def quotes_of(pusher: int, batch: int, size: int) -> list[dict[str, str]]:
    """Prices that say who pushed them and where: unique, and ordered within a pusher."""
    return [
        {"symbol": SYMBOLS[i % 2], "price": f"{pusher + 1}{batch:03d}.{i:04d}"} for i in range(size)
    ]


def assert_exactly_once_in_order(
    ticks: list[dict[str, Any]], symbol: str, pushed: list[list[str]]
) -> None:
    """`pushed`: each pusher's accepted prices of `symbol`, in the order it pushed them."""
    prices = [t["price"] for t in ticks]
    assert len(prices) == len(set(prices)), f"{symbol}: a quote published twice"
    assert sorted(prices) == sorted(p for each in pushed for p in each), f"{symbol}: lost quotes"
    seqs = [t["seq"] for t in ticks]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"{symbol}: seq gap or repeat"
    for each in pushed:
        mine = set(each)
        assert [p for p in prices if p in mine] == each, f"{symbol}: out of its pusher's order"


class TestPushToTheStandby:
    async def test_every_instance_receives_each_quote_once_in_order(
        self, redis: RedisServer, database_url: str, tmp_path: Path
    ) -> None:
        env = {"BROADCAST_URL": redis.url, "FEED_SOURCE": "ingest"}
        a = server_process(tmp_path, "a", database_url, **env)
        b = server_process(tmp_path, "b", database_url, **env)
        with running(a, b):
            leader, standby = await two_instances(a, b)
            async with (
                subscribed(leader, "AAPL") as on_leader,
                subscribed(standby, "AAPL") as on_standby,
                httpx.AsyncClient(base_url=standby.http, timeout=10) as http,
            ):
                watchers = [Collector(on_leader), Collector(on_standby)]
                pushed: list[str] = []
                for batch in range(10):
                    quotes = quotes_of(0, batch, 20)
                    response = await http.post(
                        "/v1/ingest", json={"quotes": quotes}, headers=feeder()
                    )
                    assert (response.status_code, response.json()) == (202, {"accepted": 20})
                    pushed += [q["price"] for q in quotes if q["symbol"] == "AAPL"]
                for watcher in watchers:
                    await watcher.until(set(pushed))
                await asyncio.sleep(0.5)  # room for a duplicate to show
                seen = [await watcher.stop() for watcher in watchers]
            assert await producer_role(standby) == "standby", "the standby only handed them on"

        for ticks in seen:
            assert_exactly_once_in_order(ticks, "AAPL", [pushed])
            assert ticks[0]["seq"] == 1
        assert [t["seq"] for t in seen[0]] == [t["seq"] for t in seen[1]]


class TestLeaderKilledMidPush:
    PUSHERS = 6
    BATCHES = 25
    SIZE = 60

    async def test_every_accepted_quote_arrives_once_in_order_on_the_survivor(
        self, redis: RedisServer, database_url: str, tmp_path: Path
    ) -> None:
        # FANOUT_MAX_LAG_MS: on a loaded machine the survivor's hub falls more than the default
        # 50 ms behind and skips the older ticks of a burst on purpose (seq jumps, no log): not
        # what this test is about, and what made it flaky (every seq was published).
        env = {
            "BROADCAST_URL": redis.url,
            "FEED_SOURCE": "ingest",
            "RETENTION_TICKS": "10000",
            "FANOUT_MAX_LAG_MS": "60000",
        }
        a = server_process(tmp_path, "a", database_url, **env)
        b = server_process(tmp_path, "b", database_url, **env)
        with running(a, b):
            leader, survivor = await two_instances(a, b)
            lease_holder = producer_pid(leader)
            accepted: dict[int, list[dict[str, str]]] = {p: [] for p in range(self.PUSHERS)}
            refused = 0
            third = asyncio.Event()
            total = self.PUSHERS * self.BATCHES

            async def push_all(pusher: int, http: httpx.AsyncClient) -> None:
                nonlocal refused
                for batch in range(self.BATCHES):
                    quotes = quotes_of(pusher, batch, self.SIZE)
                    while True:  # retry only what was not accepted
                        try:
                            response = await http.post(
                                "/v1/ingest", json={"quotes": quotes}, headers=feeder()
                            )
                        except httpx.TransportError:
                            refused += 1
                            continue
                        if response.status_code == 202:
                            break
                        assert response.status_code == 503, response.text
                        refused += 1
                        await asyncio.sleep(float(response.headers["retry-after"]) / 10)
                    accepted[pusher] += quotes
                    if sum(len(q) for q in accepted.values()) >= total * self.SIZE / 3:
                        third.set()

            async with contextlib.AsyncExitStack() as stack:
                streams = [
                    await stack.enter_async_context(subscribed(survivor, s)) for s in SYMBOLS
                ]
                watchers = {
                    s: Collector(stream) for s, stream in zip(SYMBOLS, streams, strict=True)
                }
                http = await stack.enter_async_context(
                    httpx.AsyncClient(base_url=survivor.http, timeout=30)
                )
                pushing = [asyncio.create_task(push_all(p, http)) for p in range(self.PUSHERS)]
                await asyncio.wait_for(third.wait(), 60)
                os.kill(lease_holder, signal.SIGKILL)  # the lease holder, mid-push
                leader.stop(signal.SIGKILL)  # and its server: the other instance must take over
                await asyncio.gather(*pushing)
                for symbol, watcher in watchers.items():
                    await watcher.until(
                        {
                            q["price"]
                            for qs in accepted.values()
                            for q in qs
                            if q["symbol"] == symbol
                        }
                    )
                await asyncio.sleep(0.5)  # room for a duplicate to show
                seen = {s: await w.stop() for s, w in watchers.items()}
            assert await producer_role(survivor) == "leader"

        for symbol in SYMBOLS:
            pushed = [[q["price"] for q in qs if q["symbol"] == symbol] for qs in accepted.values()]
            assert_exactly_once_in_order(seen[symbol], symbol, pushed)
            assert seen[symbol][0]["seq"] == 1
