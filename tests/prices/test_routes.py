"""app/prices/routes.py: the REST snapshots, and the auth every REST route shares."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from decimal import Decimal
from typing import Any

import httpx
import pytest

from tests.support import SEED_SYMBOLS as SEED_LIST
from tests.support import token
from tests.test_security import OTHER_SECRET, claims, forge

ApiFactory = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]

DECIMAL_RE = re.compile(r"^-?\d+(\.\d+)?$")
SEED_SYMBOLS = set(SEED_LIST)
INTERVAL_MS = {"1m": 60_000, "5m": 300_000, "1h": 3_600_000, "1d": 86_400_000}


def bearer(jwt: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {jwt}"}


ALL = bearer(token(ttl=3600))


@pytest.fixture
async def client(api: ApiFactory) -> AsyncIterator[httpx.AsyncClient]:
    async with api() as client:
        yield client


async def wait_for_seq(
    client: httpx.AsyncClient, symbol: str, seq: int, timeout: float = 5.0
) -> dict[str, Any]:
    """Poll the latest tick of `symbol` until its seq reaches `seq`."""
    deadline = time.monotonic() + timeout
    while True:
        response = await client.get(f"/v1/prices/{symbol}", headers=ALL)
        if response.status_code == 200 and response.json()["seq"] >= seq:
            body: dict[str, Any] = response.json()
            return body
        if time.monotonic() > deadline:
            raise TimeoutError(f"{symbol} did not reach seq {seq}: {response.text}")
        await asyncio.sleep(0.02)


def assert_tick(tick: dict[str, Any], symbol: str) -> None:
    assert tick["type"] == "tick"
    assert tick["symbol"] == symbol
    assert isinstance(tick["price"], str) and DECIMAL_RE.match(tick["price"])
    assert Decimal(tick["price"]) > 0
    assert type(tick["ts"]) is int
    assert abs(tick["ts"] - time.time() * 1000) < 60_000  # epoch milliseconds, not seconds
    assert type(tick["seq"]) is int and tick["seq"] >= 1


class TestListSymbols:
    async def test_lists_every_instrument(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/v1/symbols", headers=ALL)

        assert response.status_code == 200
        instruments = response.json()
        assert {i["symbol"] for i in instruments} == SEED_SYMBOLS
        by_symbol = {i["symbol"]: i for i in instruments}
        assert by_symbol["AAPL"]["name"] == "Apple Inc."
        assert all(isinstance(i["name"], str) and i["name"] for i in instruments)
        assert all(i["entitled"] is True for i in instruments)

    async def test_entitled_flags_follow_the_token(self, client: httpx.AsyncClient) -> None:
        only_two = bearer(token(symbols=["MSFT", "BTC-USD"]))

        response = await client.get("/v1/symbols", headers=only_two)

        assert response.status_code == 200
        entitled = {i["symbol"] for i in response.json() if i["entitled"]}
        assert entitled == {"MSFT", "BTC-USD"}
        assert {i["symbol"] for i in response.json()} == SEED_SYMBOLS


class TestReadLatestPrice:
    async def test_latest_tick(self, client: httpx.AsyncClient) -> None:
        await wait_for_seq(client, "AAPL", 1)

        response = await client.get("/v1/prices/AAPL", headers=ALL)

        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/json")
        assert_tick(response.json(), "AAPL")

    async def test_latest_moves_on(self, client: httpx.AsyncClient) -> None:
        first = await wait_for_seq(client, "AAPL", 1)

        later = await wait_for_seq(client, "AAPL", first["seq"] + 2)

        assert later["seq"] >= first["seq"] + 2
        assert later["ts"] >= first["ts"]

    @pytest.mark.parametrize("raw", ["aapl", "Aapl", "btc-usd"])
    async def test_lower_case_symbol_is_normalised(
        self, client: httpx.AsyncClient, raw: str
    ) -> None:
        await wait_for_seq(client, raw.upper(), 1)

        response = await client.get(f"/v1/prices/{raw}", headers=ALL)

        assert response.status_code == 200
        assert_tick(response.json(), raw.upper())

    @pytest.mark.parametrize(
        "raw",
        [
            pytest.param("NOPE", id="unknown"),
            pytest.param("%24%24", id="dollars"),
            pytest.param("-AAPL", id="leading-dash"),
            pytest.param("AAPLAAPLAAPLAAPLX", id="too-long"),
            pytest.param("%C3%A9", id="non-ascii"),
            pytest.param("AA%20PL", id="space"),
            pytest.param("%00", id="nul"),
        ],
    )
    async def test_unknown_or_malformed_symbol_is_404(
        self, client: httpx.AsyncClient, raw: str
    ) -> None:
        response = await client.get(f"/v1/prices/{raw}", headers=ALL)

        assert response.status_code == 404
        assert response.json()["detail"]


class TestReadLatestPrices:
    async def test_order_is_kept(self, client: httpx.AsyncClient) -> None:
        await wait_for_seq(client, "AAPL", 1)
        await wait_for_seq(client, "MSFT", 1)

        for asked, expected in (("AAPL,MSFT", ["AAPL", "MSFT"]), ("msft,aapl", ["MSFT", "AAPL"])):
            response = await client.get("/v1/prices", params={"symbols": asked}, headers=ALL)

            assert response.status_code == 200
            ticks = response.json()
            assert [t["symbol"] for t in ticks] == expected
            for tick, symbol in zip(ticks, expected, strict=True):
                assert_tick(tick, symbol)

    async def test_unknown_symbol_in_list_is_404(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/v1/prices", params={"symbols": "AAPL,NOPE"}, headers=ALL)

        assert response.status_code == 404

    @pytest.mark.parametrize(
        "params",
        [
            pytest.param({}, id="missing"),
            pytest.param({"symbols": ""}, id="empty"),
            pytest.param({"symbols": "AAPL,,MSFT"}, id="empty-item"),
        ],
    )
    async def test_bad_symbols_parameter_is_422(
        self, client: httpx.AsyncClient, params: dict[str, str]
    ) -> None:
        response = await client.get("/v1/prices", params=params, headers=ALL)

        assert response.status_code == 422

    async def test_more_than_100_symbols_is_422(self, client: httpx.AsyncClient) -> None:
        """A request-size limit: refused before any symbol is looked up."""
        symbols = sorted(SEED_SYMBOLS) + [f"X{i}" for i in range(91)]
        assert len(set(symbols)) == 101

        response = await client.get(
            "/v1/prices", params={"symbols": ",".join(symbols)}, headers=ALL
        )

        assert response.status_code == 422

    async def test_100_symbols_is_accepted(self, client: httpx.AsyncClient) -> None:
        await wait_for_seq(client, "AAPL", 1)
        await wait_for_seq(client, "MSFT", 1)

        response = await client.get(
            "/v1/prices", params={"symbols": ",".join(["AAPL", "MSFT"] * 50)}, headers=ALL
        )

        assert response.status_code == 200
        assert [t["symbol"] for t in response.json()] == ["AAPL", "MSFT"]


class TestReadPriceHistory:
    async def test_since_returns_later_ticks_oldest_first(self, client: httpx.AsyncClient) -> None:
        await wait_for_seq(client, "AAPL", 6)

        response = await client.get("/v1/prices/AAPL/history", params={"since": 2}, headers=ALL)

        assert response.status_code == 200
        ticks = response.json()
        seqs = [t["seq"] for t in ticks]
        assert seqs[0] == 3
        assert len(seqs) >= 4
        assert seqs == list(range(3, 3 + len(seqs)))  # contiguous: no gap, no duplicate
        for tick in ticks:
            assert_tick(tick, "AAPL")
        assert [t["ts"] for t in ticks] == sorted(t["ts"] for t in ticks)

    async def test_limit_after_since_gives_the_first_ones(self, client: httpx.AsyncClient) -> None:
        await wait_for_seq(client, "AAPL", 6)

        response = await client.get(
            "/v1/prices/AAPL/history", params={"since": 0, "limit": 3}, headers=ALL
        )

        assert response.status_code == 200
        assert [t["seq"] for t in response.json()] == [1, 2, 3]

    async def test_limit_without_since_gives_the_newest(self, client: httpx.AsyncClient) -> None:
        latest = await wait_for_seq(client, "AAPL", 6)

        response = await client.get("/v1/prices/AAPL/history", params={"limit": 3}, headers=ALL)

        assert response.status_code == 200
        seqs = [t["seq"] for t in response.json()]
        assert len(seqs) == 3
        assert seqs == list(range(seqs[0], seqs[0] + 3))
        assert seqs[-1] >= latest["seq"]

    async def test_since_at_latest_is_empty(self, client: httpx.AsyncClient) -> None:
        await wait_for_seq(client, "AAPL", 1)

        response = await client.get("/v1/prices/AAPL/history", params={"since": 10**9}, headers=ALL)

        assert response.status_code == 200
        assert response.json() == []

    async def test_lower_case_symbol_is_normalised(self, client: httpx.AsyncClient) -> None:
        await wait_for_seq(client, "AAPL", 2)

        response = await client.get("/v1/prices/aapl/history", params={"since": 0}, headers=ALL)

        assert response.status_code == 200
        assert {t["symbol"] for t in response.json()} == {"AAPL"}

    @pytest.mark.parametrize(
        "params",
        [
            pytest.param({"limit": 0}, id="limit-0"),
            pytest.param({"limit": 5000}, id="limit-5000"),
            pytest.param({"limit": -1}, id="limit-negative"),
            pytest.param({"since": -1}, id="since-negative"),
            pytest.param({"since": "abc"}, id="since-not-a-number"),
            pytest.param({"since": "1.5"}, id="since-fraction"),
        ],
    )
    async def test_bad_parameters_are_422(
        self, client: httpx.AsyncClient, params: dict[str, Any]
    ) -> None:
        response = await client.get("/v1/prices/AAPL/history", params=params, headers=ALL)

        assert response.status_code == 422

    async def test_unknown_symbol_is_404(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/v1/prices/NOPE/history", headers=ALL)

        assert response.status_code == 404


class TestReadCandles:
    @pytest.mark.parametrize("interval", ["1m", "5m", "1h", "1d"])
    async def test_candles(self, client: httpx.AsyncClient, interval: str) -> None:
        await wait_for_seq(client, "AAPL", 3)

        response = await client.get(
            "/v1/prices/AAPL/candles", params={"interval": interval}, headers=ALL
        )

        assert response.status_code == 200
        candles = response.json()
        assert candles
        for candle in candles:
            assert set(candle) == {"start", "open", "high", "low", "close", "volume"}
            assert type(candle["start"]) is int
            assert candle["start"] % INTERVAL_MS[interval] == 0
            values = {}
            for field in ("open", "high", "low", "close", "volume"):
                assert isinstance(candle[field], str) and DECIMAL_RE.match(candle[field]), candle
                values[field] = Decimal(candle[field])
            assert values["high"] >= values["low"]
            assert values["low"] <= values["open"] <= values["high"]
            assert values["low"] <= values["close"] <= values["high"]
            assert values["volume"] >= 0
        starts = [c["start"] for c in candles]
        assert starts == sorted(set(starts))  # oldest first, one per bucket

    async def test_default_interval_is_one_minute(self, client: httpx.AsyncClient) -> None:
        await wait_for_seq(client, "AAPL", 1)

        response = await client.get("/v1/prices/AAPL/candles", headers=ALL)

        assert response.status_code == 200
        assert all(c["start"] % INTERVAL_MS["1m"] == 0 for c in response.json())

    async def test_last_candle_closes_at_the_latest_price(self, client: httpx.AsyncClient) -> None:
        await wait_for_seq(client, "AAPL", 3)

        # The producer may tick between the two reads: retry until they agree.
        deadline = time.monotonic() + 5
        while True:
            latest = (await client.get("/v1/prices/AAPL", headers=ALL)).json()
            candles = (await client.get("/v1/prices/AAPL/candles", headers=ALL)).json()
            again = (await client.get("/v1/prices/AAPL", headers=ALL)).json()
            if latest["seq"] == again["seq"] or time.monotonic() > deadline:
                break
        assert Decimal(candles[-1]["close"]) == Decimal(latest["price"])

    async def test_limit_is_respected(self, client: httpx.AsyncClient) -> None:
        await wait_for_seq(client, "AAPL", 1)

        response = await client.get("/v1/prices/AAPL/candles", params={"limit": 1}, headers=ALL)

        assert response.status_code == 200
        assert len(response.json()) == 1

    @pytest.mark.parametrize(
        "params",
        [
            pytest.param({"interval": "2m"}, id="interval-2m"),
            pytest.param({"interval": "1w"}, id="interval-1w"),
            pytest.param({"interval": ""}, id="interval-empty"),
            pytest.param({"limit": 0}, id="limit-0"),
            pytest.param({"limit": 5000}, id="limit-5000"),
        ],
    )
    async def test_bad_parameters_are_422(
        self, client: httpx.AsyncClient, params: dict[str, Any]
    ) -> None:
        response = await client.get("/v1/prices/AAPL/candles", params=params, headers=ALL)

        assert response.status_code == 422

    async def test_unknown_symbol_is_404(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/v1/prices/NOPE/candles", headers=ALL)

        assert response.status_code == 404


SNAPSHOT_ROUTES = [
    "/v1/symbols",
    "/v1/prices/AAPL",
    "/v1/prices?symbols=AAPL,MSFT",
    "/v1/prices/AAPL/history?since=0",
    "/v1/prices/AAPL/candles?interval=1m",
]
# The SSE route answers a refused request before it streams, so it is checked here too.
PROTECTED_ROUTES = [*SNAPSHOT_ROUTES, "/v1/stream?symbols=AAPL"]

BAD_CREDENTIALS = {
    "no-header": {},
    "bearer-garbage": {"Authorization": "Bearer garbage"},
    "bearer-empty": {"Authorization": "Bearer "},
    "basic-scheme": {"Authorization": "Basic ZGVtbzpkZW1vLXNlY3JldA=="},
    "no-scheme": {"Authorization": token()},
    "wrong-signature": bearer(forge(claims(), secret=OTHER_SECRET)),
    "alg-none": bearer(forge(claims(symbols=["*"]), alg="none")),
    "wrong-aud": bearer(forge(claims(aud="other-service", symbols=["*"]))),
    "expired": bearer(token(ttl=-30)),
}


class TestAuthentication:
    @pytest.mark.parametrize("route", PROTECTED_ROUTES)
    @pytest.mark.parametrize("headers", BAD_CREDENTIALS.values(), ids=BAD_CREDENTIALS.keys())
    async def test_no_or_bad_token_is_401(
        self, client: httpx.AsyncClient, route: str, headers: dict[str, str]
    ) -> None:
        response = await client.get(route, headers=headers)

        assert response.status_code == 401
        assert response.headers["www-authenticate"].split()[0] == "Bearer"
        assert '"seq"' not in response.text

    @pytest.mark.parametrize("route", SNAPSHOT_ROUTES)
    async def test_valid_token_is_accepted(self, client: httpx.AsyncClient, route: str) -> None:
        await wait_for_seq(client, "AAPL", 1)
        await wait_for_seq(client, "MSFT", 1)

        response = await client.get(route, headers=ALL)

        assert response.status_code == 200

    async def test_token_in_query_is_not_accepted_by_rest(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/v1/symbols", params={"token": token()})

        assert response.status_code == 401


ONLY_MSFT = bearer(token(symbols=["MSFT"], ttl=3600))


class TestEntitlement:
    @pytest.mark.parametrize(
        "route",
        [
            "/v1/prices/AAPL",
            "/v1/prices/aapl",
            "/v1/prices?symbols=AAPL",
            "/v1/prices?symbols=MSFT,AAPL",
            "/v1/prices/AAPL/history?since=0",
            "/v1/prices/AAPL/candles?interval=1m",
        ],
    )
    async def test_not_entitled_is_403(self, client: httpx.AsyncClient, route: str) -> None:
        await wait_for_seq(client, "AAPL", 1)

        response = await client.get(route, headers=ONLY_MSFT)

        assert response.status_code == 403
        assert '"seq"' not in response.text

    @pytest.mark.parametrize(
        "route",
        [
            "/v1/prices/MSFT",
            "/v1/prices?symbols=MSFT",
            "/v1/prices/MSFT/history?since=0",
            "/v1/prices/MSFT/candles?interval=1m",
        ],
    )
    async def test_entitled_symbol_is_readable(self, client: httpx.AsyncClient, route: str) -> None:
        await wait_for_seq(client, "MSFT", 1)

        response = await client.get(route, headers=ONLY_MSFT)

        assert response.status_code == 200


class TestPublicRoutes:
    @pytest.mark.parametrize(
        "route", ["/", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"]
    )
    async def test_needs_no_token(self, client: httpx.AsyncClient, route: str) -> None:
        response = await client.get(route)

        assert response.status_code == 200
