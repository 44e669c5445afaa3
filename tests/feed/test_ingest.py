"""POST /v1/ingest end to end in one process (`memory://`): pushed quotes reach WebSocket
subscribers in order, each the next seq, with the fields pushed; and the 503s a feeder meets
when the producer cannot keep up (Redis inbox full, Redis down)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
import pytest
import redis as redis_py

from tests.support import LiveApp, RedisServer, open_stream, token

Live = Callable[..., AbstractAsyncContextManager[LiveApp]]
ApiFactory = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


def feeder() -> dict[str, str]:
    return {"Authorization": f"Bearer {token('feeder', symbols=['AAPL'], scopes=('publish',))}"}


def aapl(price: str, **fields: Any) -> dict[str, Any]:
    return {"symbol": "AAPL", "price": price, **fields}


class TestPushedQuotesReachSubscribers:
    async def test_in_order_each_the_next_seq_with_the_fields_pushed(self, live: Live) -> None:
        batches = [
            [
                aapl("190.0100", bid="190.0000", ask="190.0200", size="12", side="buy",
                     source_ts=1733580000001),
                {"symbol": "MSFT", "price": "415.1000"},
                aapl("190.0200", volume="1000.5"),
            ],
            [aapl("190.0300", side="sell", size="0.5", source_ts=1733580000003)],
            [aapl(f"191.{i:04d}") for i in range(50)],
        ]  # fmt: skip
        pushed = [q for b in batches for q in b if q["symbol"] == "AAPL"]
        reader = token("reader", symbols=["AAPL", "MSFT"])
        async with (
            live(feed_source="ingest") as server,
            open_stream(f"{server.ws}/v1/ws/prices/AAPL?since=0&token={reader}") as on_aapl,
            open_stream(f"{server.ws}/v1/ws/prices/MSFT?since=0&token={reader}") as on_msft,
            httpx.AsyncClient(base_url=server.http) as http,
        ):
            for quotes in batches:
                response = await http.post("/v1/ingest", json={"quotes": quotes}, headers=feeder())
                assert (response.status_code, response.json()) == (202, {"accepted": len(quotes)})
            ticks = [await on_aapl.recv_type("tick") for _ in pushed]
            msft = await on_msft.recv_type("tick")

        assert [t["seq"] for t in ticks] == list(range(1, len(pushed) + 1))
        for tick, quote in zip(ticks, pushed, strict=True):
            assert {k: tick[k] for k in quote} == quote
        assert set(ticks[0]) == {
            "type", "symbol", "price", "ts", "seq", "bid", "ask", "size", "side", "source_ts"
        }  # fmt: skip
        assert (msft["seq"], msft["price"]) == (1, "415.1000")

    async def test_prices_are_given_the_instruments_decimals(self, live: Live) -> None:
        async with (
            live(feed_source="ingest") as server,
            open_stream(f"{server.ws}/v1/ws/prices/AAPL?since=0&token={token()}") as stream,
            httpx.AsyncClient(base_url=server.http) as http,
        ):
            await http.post("/v1/ingest", json={"quotes": [aapl("189.2")]}, headers=feeder())
            tick = await stream.recv_type("tick")

        assert tick["price"] == "189.2000"  # AAPL quotes four places

    async def test_pushes_beside_the_simulated_source_keep_one_seq(self, live: Live) -> None:
        """Pushed and sourced quotes interleave, never within a symbol's seq."""
        async with (
            live(feed_source="simulated") as server,
            open_stream(f"{server.ws}/v1/ws/prices/AAPL?token={token()}") as stream,
            httpx.AsyncClient(base_url=server.http) as http,
        ):
            first = await stream.recv_type("tick", "snapshot")
            for i in range(20):
                quotes = [aapl(f"500.{i:04d}")]
                assert (
                    await http.post("/v1/ingest", json={"quotes": quotes}, headers=feeder())
                ).status_code == 202
            seen = [first]
            while sum(t["price"].startswith("500.") for t in seen) < 20:
                seen.append(await stream.recv_type("tick"))

        seqs = [t["seq"] for t in seen]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert [t["price"] for t in seen if t["price"].startswith("500.")] == [
            f"500.{i:04d}" for i in range(20)
        ]


@pytest.mark.redis
class TestBackPressure:
    async def test_a_full_inbox_answers_503_with_retry_after_and_keeps_what_it_took(
        self, api: ApiFactory, redis: RedisServer
    ) -> None:
        """No producer reads (PRODUCER=off): the inbox fills to its cap, then refuses."""
        async with api(
            broadcast_url=redis.url,
            producer="off",
            ingest_max_pending_batches=3,
            ingest_wait_seconds=0.2,
        ) as client:
            answers = [
                await client.post(
                    "/v1/ingest", json={"quotes": [aapl(f"190.{i}")]}, headers=feeder()
                )
                for i in range(5)
            ]

        assert [a.status_code for a in answers] == [202, 202, 202, 503, 503]
        refused = answers[-1]
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["code"] == "unavailable"
        assert "behind" in refused.json()["detail"]
        with redis_py.Redis.from_url(redis.url) as plain:
            kept = plain.xrange("pricefeed:ingest")
        assert len(kept) == 3, "capped by refusing, never by trimming what was accepted"

    async def test_redis_down_answers_503(self, api: ApiFactory, redis: RedisServer) -> None:
        async with api(broadcast_url=redis.url, producer="off") as client:
            redis.kill()
            response = await client.post(
                "/v1/ingest", json={"quotes": [aapl("190")]}, headers=feeder()
            )
            redis.start()

        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert "inbox is unavailable" in response.json()["detail"]
