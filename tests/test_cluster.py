"""Real uvicorn processes sharing a real redis-server: exactly-once delivery on every
instance, one producer in the cluster, failover, Redis restarts, graceful shutdown, and no
token in any log line."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from app.errors import CloseCode
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


async def collect(stream: Stream, seconds: float) -> list[dict]:  # type: ignore[type-arg]
    frames = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            frame = await stream.recv(timeout=max(deadline - time.monotonic(), 0.01))
            if frame["type"] in ("tick", "snapshot"):
                frames.append(frame)
    return frames


async def readiness(server: ServerProcess) -> tuple[int, dict]:  # type: ignore[type-arg]
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{server.http}/readyz", timeout=5)
        return response.status_code, response.json()


async def wait_for(predicate, timeout: float = 15.0, every: float = 0.1):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(every)


@contextlib.asynccontextmanager
async def watch(
    server: ServerProcess, symbol: str, since: int | None = None
) -> AsyncIterator[Stream]:
    query = f"?token={token()}" + (f"&since={since}" if since is not None else "")
    async with open_stream(f"{server.ws}/v1/ws/prices/{symbol}{query}") as stream:
        yield stream


def assert_contiguous(frames: list[dict]) -> None:  # type: ignore[type-arg]
    seqs = [f["seq"] for f in frames]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"gap or duplicate in {seqs}"


class TestTwoInstances:
    async def test_every_tick_reaches_both_instances_exactly_once(
        self, redis: RedisServer, database_url: str, tmp_path: Path
    ) -> None:
        a = server_process(tmp_path, "a", database_url, BROADCAST_URL=redis.url)
        b = server_process(tmp_path, "b", database_url, BROADCAST_URL=redis.url)
        with running(a, b):
            await asyncio.gather(a.wait_ready(), b.wait_ready())

            async def roles() -> list[str]:
                return sorted([(await readiness(s))[1]["checks"]["producer"] for s in (a, b)])

            # Ready comes before either producer process has taken the lease (its own
            # start): wait for one to lead, and never two.
            await wait_for(lambda: _one_leads(a, b))
            assert await roles() == ["leader", "standby"], "one producer in the cluster"
            async with watch(a, "AAPL") as on_a, watch(b, "AAPL") as on_b:
                got_a, got_b = await asyncio.gather(collect(on_a, 2.0), collect(on_b, 2.0))
        assert len(got_a) > 20 and len(got_b) > 20
        assert_contiguous(got_a)
        assert_contiguous(got_b)
        common = {f["seq"] for f in got_a} & {f["seq"] for f in got_b}
        assert len(common) > 15
        by_seq_a = {f["seq"]: f["price"] for f in got_a}
        by_seq_b = {f["seq"]: f["price"] for f in got_b}
        assert all(by_seq_a[s] == by_seq_b[s] for s in common), "one tick, the same everywhere"

    async def test_standby_takes_over_when_the_leader_dies(
        self, redis: RedisServer, database_url: str, tmp_path: Path
    ) -> None:
        a = server_process(tmp_path, "a", database_url, BROADCAST_URL=redis.url)
        b = server_process(tmp_path, "b", database_url, BROADCAST_URL=redis.url)
        with running(a, b):
            await asyncio.gather(a.wait_ready(), b.wait_ready())
            await wait_for(lambda: _one_leads(a, b))  # ready before either has the lease
            leader, standby = (
                (a, b) if (await readiness(a))[1]["checks"]["producer"] == "leader" else (b, a)
            )
            async with watch(standby, "MSFT") as stream:
                before = await collect(stream, 0.5)
                assert leader.process is not None
                producers = children(leader.process.pid)
                assert producers, "with Redis, the producer runs in a process of its own"
                leader.stop(signal.SIGKILL)
                await wait_for(lambda: _is_leader(standby), timeout=10)
                await wait_for(lambda: _all_gone(producers), timeout=5)
                after = await collect(stream, 1.5)
            assert before and after
            assert after[-1]["seq"] > before[-1]["seq"], "seq carries on, never restarts"
            # A client that resumes from where it was sees no gap inside the retention window.
            async with watch(standby, "MSFT", since=before[-1]["seq"]) as resumed:
                replay = await collect(resumed, 1.0)
            assert replay[0]["seq"] == before[-1]["seq"] + 1
            assert_contiguous(replay)


def children(pid: int) -> list[int]:
    """Child processes of `pid`, whichever of its threads started them."""
    return [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]


async def _all_gone(pids: list[int]) -> bool:
    """No orphan: a killed server's producer process goes with it."""
    return not any(Path(f"/proc/{pid}").exists() for pid in pids)


async def _one_leads(*servers: ServerProcess) -> bool:
    roles = [(await readiness(s))[1]["checks"]["producer"] for s in servers]
    assert roles.count("leader") <= 1, f"two producers in the cluster: {roles}"
    return roles.count("leader") == 1


async def _is_leader(server: ServerProcess) -> bool:
    status, body = await readiness(server)
    return status == 200 and body["checks"].get("producer") == "leader"


class TestRedisRestart:
    async def test_streams_resume_and_readiness_follows_redis(
        self, redis: RedisServer, database_url: str, tmp_path: Path
    ) -> None:
        server = server_process(tmp_path, "solo", database_url, BROADCAST_URL=redis.url)
        with running(server):
            await server.wait_ready()
            await wait_for(lambda: _is_leader(server))  # ready before its producer leads
            async with watch(server, "AAPL") as stream:
                before = await collect(stream, 0.5)
                redis.kill()
                await wait_for(lambda: _status_is(server, 503), timeout=10)
                redis.start()
                await wait_for(lambda: _status_is(server, 200), timeout=20)
                after = await collect(stream, 1.5)
            assert before and after, "the same connection streams again after the restart"
            assert after[0]["seq"] > before[-1]["seq"], "seq did not restart with Redis"
            assert_contiguous(after)


async def _status_is(server: ServerProcess, status: int) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return (await readiness(server))[0] == status
    return False


class TestShutdownAndLogs:
    @pytest.mark.parametrize("ws_impl", ["fast", "websockets-sansio"])
    async def test_sigterm_closes_streams_with_1001(
        self, database_url: str, tmp_path: Path, ws_impl: str
    ) -> None:
        """pricefeed's own protocol and uvicorn's (which would say 1012 by itself) alike."""
        server = server_process(tmp_path, "solo", database_url, WS_IMPL=ws_impl)
        with running(server):
            await server.wait_ready()
            async with (
                watch(server, "AAPL") as one,
                open_stream(f"{server.ws}/v1/ws?token={token()}") as many,
            ):
                await one.recv()
                await many.send({"op": "subscribe", "symbols": ["MSFT"]})
                await many.recv_type("snapshot")
                server.send_signal(signal.SIGTERM)
                codes = await asyncio.gather(one.closed_with(10), many.closed_with(10))
        assert [code for code, _ in codes] == [CloseCode.GOING_AWAY, CloseCode.GOING_AWAY]

    async def test_no_token_reaches_the_logs(self, database_url: str, tmp_path: Path) -> None:
        server = server_process(
            tmp_path, "solo", database_url, LOG_LEVEL="debug", DEMO_CLIENT_SECRET="chosen-secret-42"
        )
        secret_token = token("log-check")
        with running(server):
            await server.wait_ready()
            async with httpx.AsyncClient(base_url=server.http) as client:
                await client.get(
                    "/v1/prices/AAPL", headers={"Authorization": f"Bearer {secret_token}"}
                )
                await client.get(f"/v1/prices/AAPL?token={secret_token}")
                issued = await client.post(
                    "/v1/auth/token",
                    data={
                        "grant_type": "client_credentials",
                        "client_id": "demo",
                        "client_secret": "chosen-secret-42",
                    },
                )
                issued_token = issued.json()["access_token"]
            async with watch(server, "AAPL") as stream:
                await stream.recv()
            async with open_stream(f"{server.ws}/v1/ws?token={issued_token}") as stream:
                await stream.send({"op": "auth", "token": "garbage-but-secret-ish"})
                await stream.closed_with()
            server.stop()
            log = server.log()
        assert "WebSocket /v1/ws" in log, "the access lines are there"
        assert "token=[redacted]" in log
        assert "/docs" in log and "get a token: curl" in log, "the log says how to start"
        for secret in (secret_token, issued_token, secret_token.split(".")[2], "chosen-secret-42"):
            assert secret not in log


class TestSeqNeverRestarts:
    async def test_new_leader_after_redis_lost_everything_resumes_above_the_old_seq(
        self, redis: RedisServer, database_url: str, tmp_path: Path
    ) -> None:
        """Redis restarts empty and the producer changes: the database checkpoint keeps seq
        going forward (a visible jump), never back to 1."""
        a = server_process(tmp_path, "a", database_url, BROADCAST_URL=redis.url)
        with running(a):
            await a.wait_ready()
            await wait_for(lambda: _is_leader(a))  # ready before its producer leads
            async with watch(a, "AAPL") as stream:
                await asyncio.sleep(2.5)  # past one checkpoint
                before = await collect(stream, 0.5)
            a.stop(signal.SIGKILL)
        redis.restart()  # no persistence: the tick store is gone
        b = server_process(tmp_path, "b", database_url, BROADCAST_URL=redis.url)
        with running(b):
            await b.wait_ready()
            await wait_for(lambda: _is_leader(b))  # once a's lease has lapsed
            async with watch(b, "AAPL") as stream:
                after = await collect(stream, 1.0)
        assert before and after
        assert after[0]["seq"] > before[-1]["seq"], "seq went forward, not back to 1"
