"""A `since` or `seq` a client sends beyond 2^63 - 1 (what Redis stream IDs and PostgreSQL's
BIGINT hold) is the client's mistake, answered as the contract says on every route: 422 over
HTTP, `error` frame `invalid_message` on the multiplexed WebSocket, close 1008 on the
one-symbol WebSocket. Never a 503 "retry shortly", a store error or a snapshot as if all
were well; and 2^63 - 1 itself is accepted."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import httpx
import pytest

from app.errors import CloseCode
from tests.support import LiveApp, RedisServer, open_stream, token

ApiFactory = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]
LiveFactory = Callable[..., AbstractAsyncContextManager[LiveApp]]

MAX = 2**63 - 1
BEYOND = [2**63, 2**64 - 1, 2**64, 10**30]


def auth() -> dict[str, str]:
    """A fresh token: one minted at import would expire in a suite that runs past its TTL."""
    return {"Authorization": f"Bearer {token()}"}


class TestRest:
    @pytest.mark.parametrize("since", BEYOND)
    async def test_history_since_beyond_is_422(self, api: ApiFactory, since: int) -> None:
        async with api() as client:
            response = await client.get(f"/v1/prices/AAPL/history?since={since}", headers=auth())

        assert response.status_code == 422
        assert response.json()["code"] == "invalid_request"
        assert "since" in response.json()["detail"]

    @pytest.mark.redis
    @pytest.mark.parametrize("since", [2**64 - 1, 10**30])
    async def test_on_the_redis_store_too(
        self, api: ApiFactory, redis: RedisServer, since: int
    ) -> None:
        """What Redis refuses as a stream ID answered 503 "retry shortly" before."""
        async with api(broadcast_url=redis.url) as client:
            response = await client.get(f"/v1/prices/AAPL/history?since={since}", headers=auth())
            largest = await client.get(f"/v1/prices/AAPL/history?since={MAX}", headers=auth())

        assert response.status_code == 422
        assert (largest.status_code, largest.json()) == (200, [])

    async def test_the_largest_seq_is_accepted(self, api: ApiFactory) -> None:
        async with api() as client:
            response = await client.get(f"/v1/prices/AAPL/history?since={MAX}", headers=auth())

        assert (response.status_code, response.json()) == (200, [])


class TestServerSentEvents:
    @pytest.mark.parametrize("seq", BEYOND)
    async def test_last_event_id_beyond_is_422(self, live: LiveFactory, seq: int) -> None:
        async with live() as server, httpx.AsyncClient(base_url=server.http) as http:
            response = await http.get(
                "/v1/stream?symbols=AAPL", headers={**auth(), "Last-Event-ID": f"AAPL:{seq}"}
            )

        assert response.status_code == 422
        assert response.json()["code"] == "invalid_request"

    async def test_the_largest_seq_resumes(self, live: LiveFactory) -> None:
        headers = {**auth(), "Last-Event-ID": f"AAPL:{MAX}"}
        async with (
            live() as server,
            httpx.AsyncClient(base_url=server.http) as http,
            http.stream("GET", "/v1/stream?symbols=AAPL", headers=headers) as response,
        ):
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")


class TestWebSocket:
    @pytest.mark.parametrize("since", BEYOND)
    async def test_one_symbol_since_beyond_closes_1008(self, live: LiveFactory, since: int) -> None:
        url = f"/v1/ws/prices/AAPL?token={token()}&since={since}"
        async with live() as server, open_stream(server.ws + url) as stream:
            code, frames = await stream.closed_with()

        assert (code, frames) == (CloseCode.POLICY, [])

    async def test_one_symbol_largest_since_gets_a_snapshot(self, live: LiveFactory) -> None:
        url = f"/v1/ws/prices/AAPL?token={token()}&since={MAX}"
        async with live() as server, open_stream(server.ws + url) as stream:
            assert (await stream.recv())["type"] == "snapshot"

    @pytest.mark.parametrize("since", BEYOND)
    async def test_multiplexed_since_beyond_is_an_error_frame(
        self, live: LiveFactory, since: int
    ) -> None:
        async with live() as server, open_stream(f"{server.ws}/v1/ws?token={token()}") as stream:
            await stream.send(
                f'{{"op": "subscribe", "symbols": ["AAPL"], "since": {{"AAPL": {since}}}}}'
            )
            error = await stream.recv_type("error", "subscribed", "snapshot")
            await stream.send({"op": "ping"})
            pong = await stream.recv_type("pong")

        assert error["type"] == "error" and error["code"] == "invalid_message"
        assert "since" in error["message"]
        assert pong == {"type": "pong"}  # the connection stays

    async def test_multiplexed_largest_since_gets_a_snapshot(self, live: LiveFactory) -> None:
        async with live() as server, open_stream(f"{server.ws}/v1/ws?token={token()}") as stream:
            await stream.send({"op": "subscribe", "symbols": ["AAPL"], "since": {"AAPL": MAX}})
            await stream.recv_type("subscribed")
            assert (await stream.recv_type("snapshot", "error"))["type"] == "snapshot"
