"""app/prices/leases.py: WS_MAX_CONNECTIONS_PER_SUBJECT counted across every instance (WS and
SSE together) through Redis, healing when streams end and when an instance dies."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from app.errors import CloseCode, RateLimited
from app.prices.leases import StreamLeases
from app.redis_client import create_redis
from tests.support import LiveApp, RedisServer, open_stream, server_process, token

pytestmark = pytest.mark.redis

LiveFactory = Callable[..., AbstractAsyncContextManager[LiveApp]]


@asynccontextmanager
async def sse(server: LiveApp, subject: str) -> AsyncIterator[httpx.Response]:
    async with (
        httpx.AsyncClient(timeout=5) as client,
        client.stream(
            "GET",
            f"{server.http}/v1/stream?symbols=AAPL",
            headers={"Authorization": f"Bearer {token(subject)}"},
        ) as response,
    ):
        yield response


class TestAcrossInstances:
    async def test_ws_and_sse_share_one_count_over_two_instances(
        self, live: LiveFactory, redis: RedisServer
    ) -> None:
        settings = {"broadcast_url": redis.url, "ws_max_connections_per_subject": 2}
        async with live(**settings) as a, live(**settings, producer="off") as b:
            url_a = f"{a.ws}/v1/ws?token={token('greedy')}"
            async with open_stream(url_a) as first, sse(b, "greedy") as second:
                assert second.status_code == 200
                await first.send({"op": "ping"})
                await first.recv_type("pong")
                async with open_stream(url_a) as third_ws:
                    code, _ = await third_ws.closed_with()
                async with sse(b, "greedy") as third_sse:
                    refused = third_sse.status_code, await third_sse.aread()
                async with sse(b, "someone-else") as other:
                    assert other.status_code == 200
            # both ended: the count heals (the leases go soon after the streams)
            deadline = time.monotonic() + 5
            while True:
                async with sse(b, "greedy") as again, sse(b, "greedy") as twice:
                    statuses = (again.status_code, twice.status_code)
                if statuses == (200, 200) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)

        assert code == CloseCode.POLICY
        assert refused[0] == 429 and b'"code":"rate_limited"' in refused[1]
        assert statuses == (200, 200)

    @pytest.mark.slow
    async def test_a_killed_instances_streams_stop_counting_within_a_lease(
        self, live: LiveFactory, redis: RedisServer, database_url: str, tmp_path: Path
    ) -> None:
        limits = {"ws_max_connections_per_subject": 2, "stream_lease_seconds": 2.0}
        doomed = server_process(
            tmp_path,
            "doomed",
            database_url,
            BROADCAST_URL=redis.url,
            **{name.upper(): str(value) for name, value in limits.items()},
        )
        doomed.start()
        try:
            await doomed.wait_ready()
            async with (
                live(broadcast_url=redis.url, producer="off", **limits) as survivor,
                AsyncExitStack() as held,
            ):
                for _ in range(2):
                    stream = await held.enter_async_context(
                        open_stream(f"{doomed.ws}/v1/ws?token={token('greedy')}")
                    )
                    await stream.send({"op": "ping"})
                    await stream.recv_type("pong")
                url = f"{survivor.ws}/v1/ws?token={token('greedy')}"
                async with open_stream(url) as refused:
                    code, _ = await refused.closed_with()
                doomed.stop(signal.SIGKILL)  # no close, no goodbye to Redis
                killed = time.monotonic()
                while True:
                    async with open_stream(url) as stream:
                        try:
                            await stream.send({"op": "ping"})
                            await stream.recv_type("pong", timeout=2)
                            break
                        except ConnectionClosed:  # 1008: the dead streams still count
                            assert time.monotonic() - killed < 5, "the dead streams count on"
                    await asyncio.sleep(0.1)
                healed_after = time.monotonic() - killed
        finally:
            doomed.stop(signal.SIGKILL)
        assert code == CloseCode.POLICY
        assert healed_after <= 2.5  # one lease, and the time to notice

    async def test_with_redis_down_the_instances_own_count_admits(
        self, live: LiveFactory, redis: RedisServer
    ) -> None:
        async with live(
            broadcast_url=redis.url, producer="off", ws_max_connections_per_subject=1
        ) as server:
            redis.kill()
            url = f"{server.ws}/v1/ws?token={token('greedy')}"
            async with open_stream(url) as admitted:
                await admitted.send({"op": "ping"})
                await admitted.recv_type("pong")
                async with open_stream(url) as refused:
                    code, _ = await refused.closed_with()
        assert code == CloseCode.POLICY


class TestLeases:
    async def test_a_dead_instances_streams_stop_counting_within_a_lease(
        self, redis: RedisServer
    ) -> None:
        client = create_redis(redis.url)
        try:
            a, b = (
                StreamLeases(client, prefix="t", instance=name, limit=2, lease_seconds=1.0)
                for name in ("a", "b")
            )
            await a.acquire("sub")
            await a.acquire("sub")
            with pytest.raises(RateLimited):
                await b.acquire("sub")
            # a alive: renewing keeps its streams counted past their first lease
            renewing = asyncio.create_task(a.run())
            await asyncio.sleep(1.5)
            with pytest.raises(RateLimited):
                await b.acquire("sub")
            renewing.cancel()  # a dies: nothing renews, nothing is given back
            started = time.monotonic()
            while True:
                try:
                    await b.acquire("sub")
                    break
                except RateLimited:
                    assert time.monotonic() - started < 3, "a's leases never ran out"
                    await asyncio.sleep(0.05)
        finally:
            await client.aclose()
        assert time.monotonic() - started <= 1.5

    async def test_a_released_stream_stops_counting_at_once(self, redis: RedisServer) -> None:
        client = create_redis(redis.url)
        try:
            leases = StreamLeases(client, prefix="t", instance="a", limit=1, lease_seconds=60)
            member = await leases.acquire("sub")
            with pytest.raises(RateLimited):
                await leases.acquire("sub")
            leases.release("sub", member)
            await leases.close()  # waits for the removal
            await leases.acquire("sub")
        finally:
            await client.aclose()

    async def test_a_renewal_writes_back_leases_redis_lost(self, redis: RedisServer) -> None:
        client = create_redis(redis.url)
        try:
            a = StreamLeases(client, prefix="t", instance="a", limit=1, lease_seconds=60)
            b = StreamLeases(client, prefix="t", instance="b", limit=1, lease_seconds=60)
            await a.acquire("sub")
            await client.flushall()  # a Redis restart without persistence
            await a.renew()
            with pytest.raises(RateLimited):
                await b.acquire("sub")
        finally:
            await client.aclose()
