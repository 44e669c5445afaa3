"""Instruments added and disabled while the service runs, end to end: the admin command in a
process of its own, real servers, real clients. Within 5 s every instance lists and routes a
new instrument and its ticks reach WebSocket subscribers; once it is disabled, every instance
answers 404, a per-symbol WebSocket on it closes with 4404, a multiplexed one is told (error,
then unsubscribed) and goes on with its other symbols without a gap, and SSE says so too."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.instruments.admin_support import add_instrument, disable_instrument
from tests.support import (
    LiveApp,
    RedisServer,
    ServerProcess,
    Stream,
    open_stream,
    running,
    server_process,
    token,
)

NEW = "XRP-USD"
WITHIN = 5.0  # the contract: running instances see a change within 5 s

Server = ServerProcess | LiveApp


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Until `check()` holds, for at most WITHIN seconds (the contract's bound)."""
    deadline = time.monotonic() + WITHIN
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WITHIN:g} s: {what}")
        await asyncio.sleep(0.05)


async def get(server: Server, path: str, bearer: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.http, timeout=5) as http:
        return await http.get(path, headers={"Authorization": f"Bearer {bearer}"})


async def listed(server: Server, bearer: str) -> list[str]:
    answer = await get(server, "/v1/symbols", bearer)
    assert answer.status_code == 200
    return [i["symbol"] for i in answer.json()]


async def frames_until(
    stream: Stream, done: Callable[[dict[str, Any]], bool], seen: list[dict[str, Any]]
) -> dict[str, Any]:
    """Read frames onto `seen` until one for which `done` holds (within WITHIN s); that one."""
    deadline = time.monotonic() + WITHIN
    while True:
        frame = await stream.recv(max(deadline - time.monotonic(), 0.01))
        seen.append(frame)
        if done(frame):
            return frame


def is_tick_of(symbol: str) -> Callable[[dict[str, Any]], bool]:
    return lambda f: f.get("type") in ("tick", "snapshot") and f.get("symbol") == symbol


def seqs_of(frames: list[dict[str, Any]], symbol: str) -> list[int]:
    return [f["seq"] for f in frames if is_tick_of(symbol)(f)]


async def an_instrument_comes_and_goes(servers: list[Server], database_url: str) -> None:
    """The whole story, on every one of `servers` (which share `database_url`)."""
    bearer = token()
    async with AsyncExitStack() as stack:
        # A multiplexed watcher of AAPL on every instance, from before the change to after it.
        muxes: list[Stream] = []
        mux_frames: list[list[dict[str, Any]]] = []
        for server in servers:
            mux = await stack.enter_async_context(open_stream(f"{server.ws}/v1/ws?token={bearer}"))
            await mux.send({"op": "subscribe", "symbols": ["AAPL"]})
            seen: list[dict[str, Any]] = []
            await frames_until(mux, is_tick_of("AAPL"), seen)
            muxes.append(mux)
            mux_frames.append(seen)
        for server in servers:
            assert (await get(server, f"/v1/prices/{NEW}", bearer)).status_code == 404

        line = await asyncio.to_thread(
            add_instrument, database_url, NEW, "--reference-price", "0.5000"
        )
        assert line.startswith(f"added {NEW} (")
        for server in servers:
            await eventually(lambda s=server: _lists(s, bearer), f"{NEW} listed on {server.http}")
        for server in servers:
            await eventually(lambda s=server: _priced(s, bearer), f"a price of {NEW}")
            price = (await get(server, f"/v1/prices/{NEW.lower()}", bearer)).json()["price"]
            assert len(price.split(".")[1]) == 4  # at the instrument's precision

        # Its ticks reach WebSocket subscribers: one-symbol routes, and the multiplexed ones.
        singles: list[Stream] = []
        for server in servers:
            single = await stack.enter_async_context(
                open_stream(f"{server.ws}/v1/ws/prices/{NEW}?token={bearer}")
            )
            first, then = await single.recv(), await single.recv_type("tick")
            assert (first["type"], first["symbol"]) == ("snapshot", NEW)
            assert then["symbol"] == NEW and then["seq"] > first["seq"]
            singles.append(single)
        for mux, seen in zip(muxes, mux_frames, strict=True):
            await mux.send({"op": "subscribe", "symbols": [NEW]})
            await frames_until(mux, lambda f: f.get("type") == "tick" and f["symbol"] == NEW, seen)

        await asyncio.to_thread(disable_instrument, database_url, NEW)

        # Per-symbol streams close with 4404, nothing after the close.
        closes = await asyncio.gather(*(s.closed_with(timeout=WITHIN) for s in singles))
        assert [code for code, _ in closes] == [4404] * len(servers)
        # Multiplexed ones: told, unsubscribed, and going on with AAPL.
        for mux, seen in zip(muxes, mux_frames, strict=True):
            error = await frames_until(mux, lambda f: f.get("type") == "error", seen)
            assert error["code"] == "unknown_symbol" and error["symbols"] == [NEW]
            assert NEW in error["message"]
            after: list[dict[str, Any]] = []
            control = await frames_until(mux, lambda f: f.get("type") != "tick", after)
            assert control == {"type": "unsubscribed", "symbols": [NEW]}
            for _ in range(10):  # AAPL keeps coming; the disabled symbol never again
                await frames_until(mux, is_tick_of("AAPL"), after)
            assert not [f for f in after if f.get("symbol") == NEW]
            seen += after
            aapl = seqs_of(seen, "AAPL")
            # The instrument's coming and going cost AAPL nothing: no gap, no duplicate.
            assert aapl == list(range(aapl[0], aapl[0] + len(aapl)))

        for server in servers:
            assert (await get(server, f"/v1/prices/{NEW}", bearer)).status_code == 404
            assert NEW not in await listed(server, bearer)
        async with open_stream(f"{servers[0].ws}/v1/ws/prices/{NEW}?token={bearer}") as late:
            code, _ = await late.closed_with()
            assert code == 4404


async def _lists(server: Server, bearer: str) -> bool:
    return NEW in await listed(server, bearer)


async def _priced(server: Server, bearer: str) -> bool:
    answer = await get(server, f"/v1/prices/{NEW}", bearer)
    assert answer.status_code in (200, 503), answer.text  # 503: routed, no tick yet
    return answer.status_code == 200


@pytest.mark.redis
@pytest.mark.slow
async def test_two_instances_on_redis_see_an_instrument_come_and_go(
    redis: RedisServer, database_url: str, tmp_path: Path
) -> None:
    """With Redis each server runs its producer in a process of its own (`python -m app.feed`):
    the leader's must pick the instrument up, and both hubs subscribe to its channel."""
    servers = [
        server_process(tmp_path, name, database_url, BROADCAST_URL=redis.url) for name in ("a", "b")
    ]
    with running(*servers, sig=signal.SIGTERM):
        await asyncio.gather(*(s.wait_ready() for s in servers))
        await an_instrument_comes_and_goes(list(servers), database_url)


@pytest.mark.slow
async def test_one_instance_on_memory_sees_an_instrument_come_and_go(
    database_url: str, tmp_path: Path
) -> None:
    server = server_process(tmp_path, "solo", database_url)
    with running(server, sig=signal.SIGTERM):
        await server.wait_ready()
        await an_instrument_comes_and_goes([server], database_url)


Live = Callable[..., AbstractAsyncContextManager[LiveApp]]


@contextlib.asynccontextmanager
async def sse(server: LiveApp, symbols: str, bearer: str) -> AsyncIterator[AsyncIterator[str]]:
    async with (
        httpx.AsyncClient(base_url=server.http, timeout=10) as http,
        http.stream(
            "GET", f"/v1/stream?symbols={symbols}", headers={"Authorization": f"Bearer {bearer}"}
        ) as response,
    ):
        assert response.status_code == 200
        yield response.aiter_lines()


async def events(lines: AsyncIterator[str], until: Callable[[str, Any], bool]) -> list[Any]:
    """(event, data) pairs until one for which `until` holds, or the stream ends."""
    got: list[Any] = []
    event = None

    async def read() -> None:
        nonlocal event
        async for line in lines:
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                got.append((event, json.loads(line.removeprefix("data: "))))
                if until(*got[-1]):
                    return

    await asyncio.wait_for(read(), WITHIN)
    return got


async def test_sse_is_told_and_ends_when_its_only_symbol_goes_and_goes_on_otherwise(
    live: Live, database_url: str
) -> None:
    bearer = token()
    await asyncio.to_thread(add_instrument, database_url, NEW)
    async with live(instrument_poll_seconds=0.2) as server:
        await eventually(lambda: _lists(server, bearer), f"{NEW} listed")
        async with sse(server, NEW, bearer) as only, sse(server, f"{NEW},AAPL", bearer) as both:
            await events(only, lambda e, d: e == "tick")
            await events(both, lambda e, d: e == "tick" and d["symbol"] == NEW)
            await asyncio.to_thread(disable_instrument, database_url, NEW)

            told = {"code": "unknown_symbol", "message": f"{NEW} is no longer available"}
            ending = await events(only, lambda e, d: e == "error")
            assert ending[-1] == ("error", {**told, "symbols": [NEW]})
            assert await events(only, lambda e, d: True) == []  # and the stream ended there

            going_on = await events(both, lambda e, d: e == "error")
            assert going_on[-1] == ("error", {**told, "symbols": [NEW]})
            ticks: list[str] = []

            def ten_ticks(event: str, data: Any) -> bool:
                if event == "tick":
                    ticks.append(data["symbol"])
                return len(ticks) == 10

            await events(both, ten_ticks)
            assert ticks == ["AAPL"] * 10
