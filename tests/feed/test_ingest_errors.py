"""POST /v1/ingest refuses what the contract says it refuses, in the shape of every error,
naming the bad quote's index and the reason, and publishes nothing of a refused batch.

FEED_SOURCE=ingest: only pushed quotes move a price, so "nothing published" is seen in the
store: after each refusal a good sentinel quote is pushed, and it is the next tick.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, closing
from typing import Any

import httpx
import orjson
import pytest

from tests.support import token

ApiFactory = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]

GOOD = {"symbol": "AAPL", "price": "189.2300"}


def publisher() -> dict[str, str]:
    return {"Authorization": f"Bearer {token('feeder', symbols=['AAPL'], scopes=('publish',))}"}


def reader() -> dict[str, str]:
    return {"Authorization": f"Bearer {token('reader')}"}


def batch(*bad: dict[str, Any]) -> dict[str, Any]:
    """A good quote first, then the bad ones: index 1 is the first bad one."""
    return {"quotes": [GOOD, *bad]}


async def push(client: httpx.AsyncClient, body: Any, **headers: str) -> httpx.Response:
    return await client.post(
        "/v1/ingest",
        content=body if isinstance(body, bytes) else orjson.dumps(body),
        headers={"Content-Type": "application/json", **(headers or publisher())},
    )


async def history(client: httpx.AsyncClient, symbol: str) -> list[dict[str, Any]]:
    response = await client.get(f"/v1/prices/{symbol}/history", headers=reader())
    assert response.status_code == 200
    ticks: list[dict[str, Any]] = response.json()
    return ticks


async def wait_for_ticks(client: httpx.AsyncClient, symbol: str, count: int) -> list[dict]:  # type: ignore[type-arg]
    deadline = time.monotonic() + 10
    while True:
        ticks = await history(client, symbol)
        if len(ticks) >= count or time.monotonic() > deadline:
            return ticks
        await asyncio.sleep(0.02)


def disable(database_url: str, symbol: str) -> None:
    path = database_url.removeprefix("sqlite+aiosqlite:///")
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("UPDATE instruments SET active = 0 WHERE symbol = ?", (symbol,))
        conn.commit()


@pytest.fixture
async def client(api: ApiFactory, database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    disable(database_url, "TSLA")  # an instrument that exists, inactive
    async with api(feed_source="ingest") as rest:
        yield rest


def bad_quote(**fields: Any) -> dict[str, Any]:
    return {**GOOD, **fields}


# (body, where the error is, its `type`, words of its message)
BAD_BATCHES = [
    pytest.param(batch({"symbol": "NOPE", "price": "1.00"}), "quotes.1.symbol",
                 "unknown_symbol", "NOPE", id="unknown-symbol"),
    pytest.param(batch({"symbol": "TSLA", "price": "245.00"}), "quotes.1.symbol",
                 "unknown_symbol", "TSLA", id="inactive-symbol"),
    pytest.param(batch(bad_quote(price="abc")), "quotes.1.price", "bad_price", "abc",
                 id="price-abc"),
    pytest.param(batch(bad_quote(price="-1")), "quotes.1.price", "bad_price", "-1",
                 id="price-negative"),
    pytest.param(batch(bad_quote(price="1e9999")), "quotes.1.price", "bad_price", "1e9999",
                 id="price-exponent"),
    pytest.param(batch(bad_quote(price="NaN")), "quotes.1.price", "bad_price", "NaN",
                 id="price-nan"),
    pytest.param(batch(bad_quote(price="0")), "quotes.1.price", "bad_price", "greater than zero",
                 id="price-zero"),
    pytest.param(batch(bad_quote(price=189.23)), "quotes.1.price", "bad_price",
                 "not a JSON number", id="price-float"),
    pytest.param(batch(bad_quote(price="189.23456")), "quotes.1.price", "too_many_decimals",
                 "more than 4 decimals", id="too-many-decimals"),
    pytest.param(batch(bad_quote(bid="189.23456")), "quotes.1.bid", "too_many_decimals",
                 "more than 4 decimals", id="bid-too-many-decimals"),
    pytest.param(batch(bad_quote(size=1)), "quotes.1.size", "bad_size", "not a JSON number",
                 id="size-number"),
    pytest.param(batch(bad_quote(volume="-5")), "quotes.1.volume", "bad_volume", "-5",
                 id="volume-negative"),
    pytest.param(batch(bad_quote(side="hold")), "quotes.1.side", "bad_side", "hold",
                 id="bad-side"),
    pytest.param(batch(bad_quote(source_ts=-1)), "quotes.1.source_ts", "greater_than_equal",
                 "greater than or equal to 0", id="source-ts-negative"),
    pytest.param(batch(bad_quote(source_ts="1733580000000")), "quotes.1.source_ts", "int_type",
                 "valid integer", id="source-ts-string"),
    pytest.param(batch(bad_quote(source_ts=1.5)), "quotes.1.source_ts", "int_type",
                 "valid integer", id="source-ts-float"),
    pytest.param(batch(bad_quote(colour="red")), "quotes.1.colour", "extra_forbidden",
                 "Extra inputs", id="unknown-quote-field"),
    pytest.param({**batch(), "source": "x"}, "source", "extra_forbidden", "Extra inputs",
                 id="unknown-batch-field"),
    pytest.param({"quotes": [GOOD] * 1001}, "quotes", "too_long", "at most 1000",
                 id="1001-quotes"),
    pytest.param({"quotes": []}, "quotes", "too_short", "at least 1", id="no-quotes"),
    pytest.param({}, "quotes", "missing", "Field required", id="no-quotes-field"),
    pytest.param(b'{"quotes": [', "", "json_invalid", "Invalid JSON", id="not-json"),
    pytest.param([GOOD], "", "model_type", "should be an object", id="not-an-object"),
]  # fmt: skip


class TestRefused:
    @pytest.mark.parametrize(("body", "where", "kind", "words"), BAD_BATCHES)
    async def test_422_names_the_quote_and_nothing_is_published(
        self, client: httpx.AsyncClient, body: Any, where: str, kind: str, words: str
    ) -> None:
        assert (await push(client, {"quotes": [{"symbol": "AAPL", "price": "100"}]})).json() == {
            "accepted": 1
        }
        before = await wait_for_ticks(client, "AAPL", 1)

        response = await push(client, body)

        assert response.status_code == 422
        answer = response.json()
        assert answer["code"] == "invalid_request"
        place = f"body field {where!r}" if where else "request body"
        assert answer["detail"].startswith(place), answer["detail"]
        assert words in answer["detail"]
        (error,) = [e for e in answer["errors"] if e["type"] == kind]
        assert ".".join(str(p) for p in error["loc"]) == ".".join(["body", where]).rstrip(".")
        await self.assert_nothing_published(client, before)

    @staticmethod
    async def assert_nothing_published(
        client: httpx.AsyncClient, before: list[dict[str, Any]]
    ) -> None:
        """The sentinel pushed after the refusal is the very next tick: nothing came between."""
        sentinel = {"symbol": "AAPL", "price": "111.1111"}
        assert (await push(client, {"quotes": [sentinel]})).status_code == 202
        after = await wait_for_ticks(client, "AAPL", len(before) + 1)
        assert after[: len(before)] == before
        assert [(t["seq"], t["price"]) for t in after[len(before) :]] == [
            (before[-1]["seq"] + 1, "111.1111")
        ]

    async def test_every_bad_quote_is_named(self, client: httpx.AsyncClient) -> None:
        response = await push(client, batch(bad_quote(price="abc"), GOOD, bad_quote(side="x")))

        assert response.status_code == 422
        places = [e["loc"] for e in response.json()["errors"]]
        assert places == [["body", "quotes", 1, "price"], ["body", "quotes", 3, "side"]]

    async def test_without_a_token_401(self, client: httpx.AsyncClient) -> None:
        response = await client.post("/v1/ingest", json=batch())

        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json() == {
            "detail": "a bearer token is required",
            "code": "unauthenticated",
        }

    async def test_a_bad_token_401(self, client: httpx.AsyncClient) -> None:
        response = await push(client, batch(), Authorization="Bearer not-a-jwt")

        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"

    async def test_without_the_publish_scope_403(self, client: httpx.AsyncClient) -> None:
        response = await push(client, batch(), **reader())

        assert response.status_code == 403
        assert response.json() == {
            "detail": "this needs a token with the 'publish' scope",
            "code": "forbidden",
        }
        assert await history(client, "AAPL") == []

    async def test_a_body_past_the_limit_413(self, client: httpx.AsyncClient) -> None:
        huge = orjson.dumps({"quotes": [{**GOOD, "symbol": "A" * 32}] * 1000}) + b" " * 1_100_000

        response = await push(client, huge)

        assert response.status_code == 413
        assert response.json()["code"] == "payload_too_large"
        assert await history(client, "AAPL") == []


class TestNoProducer:
    async def test_memory_without_a_producer_says_why(self, api: ApiFactory) -> None:
        async with api(feed_source="ingest", producer="off") as client:
            response = await push(client, batch())

        assert response.status_code == 503
        assert response.json()["code"] == "unavailable"
        assert "PRODUCER=off" in response.json()["detail"]
