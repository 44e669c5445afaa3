"""app/ratelimit.py and the REST limit: a token bucket per token subject (before auth, per
client address), in process with memory:// and shared by every instance with Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import httpx
import pytest

from app.ratelimit import MemoryBuckets, RedisBuckets, retry_after
from app.redis_client import create_redis
from tests.support import RedisServer, free_port, token

ApiFactory = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


def bearer(subject: str = "tester") -> dict[str, str]:
    return {"Authorization": f"Bearer {token(subject)}"}


async def spend(client: httpx.AsyncClient, n: int, headers: dict[str, str]) -> list[int]:
    return [(await client.get("/v1/symbols", headers=headers)).status_code for _ in range(n)]


def refused_count(metrics: httpx.Response) -> float:
    for line in metrics.text.splitlines():
        if line.startswith('pricefeed_requests_refused_total{limit="rest"}'):
            return float(line.split()[-1])
    return 0.0


async def poll_until_allowed(client: httpx.AsyncClient, headers: dict[str, str]) -> float:
    """Seconds until the bucket lets a request through again."""
    started = time.monotonic()
    while time.monotonic() - started < 10:
        if (await client.get("/v1/symbols", headers=headers)).status_code == 200:
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    raise AssertionError("the bucket never refilled")


class TestRestLimitInProcess:
    async def test_a_burst_then_429_with_retry_after(self, api: ApiFactory) -> None:
        async with api(rest_rate_per_second=0.2, rest_rate_burst=5) as client:
            before = refused_count(await client.get("/metrics"))
            statuses = await spend(client, 5, bearer())
            refused = await client.get("/v1/symbols", headers=bearer())
            after = refused_count(await client.get("/metrics"))

        assert statuses == [200] * 5
        assert refused.status_code == 429
        assert refused.json() == {
            "detail": "too many requests for this token subject or client address; retry later",
            "code": "rate_limited",
        }
        # one token at 0.2/s: 5 s away, in whole seconds
        assert refused.headers["Retry-After"] == "5"
        assert after == before + 1

    async def test_the_bucket_refills(self, api: ApiFactory) -> None:
        async with api(rest_rate_per_second=10, rest_rate_burst=3) as client:
            assert await spend(client, 3, bearer()) == [200] * 3
            refused = await client.get("/v1/symbols", headers=bearer())
            waited = await poll_until_allowed(client, bearer())

        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
        assert waited < 2  # a token every 0.1 s

    async def test_subjects_have_buckets_of_their_own(self, api: ApiFactory) -> None:
        async with api(rest_rate_per_second=0.1, rest_rate_burst=2) as client:
            assert await spend(client, 3, bearer("greedy")) == [200, 200, 429]
            assert await spend(client, 2, bearer("neighbour")) == [200, 200]

    async def test_without_a_token_the_client_address_is_limited(self, api: ApiFactory) -> None:
        async with api(rest_rate_per_second=0.1, rest_rate_burst=2) as client:
            anonymous = await spend(client, 3, {})
            forged = await client.get("/v1/symbols", headers={"Authorization": "Bearer nope"})
            with_token = await client.get("/v1/symbols", headers=bearer())

        assert anonymous == [401, 401, 429]
        assert forged.status_code == 429  # the same address's bucket
        assert with_token.status_code == 200  # a subject's bucket is not the address's

    async def test_operations_docs_and_board_are_not_limited(self, api: ApiFactory) -> None:
        async with api(rest_rate_per_second=0.1, rest_rate_burst=1) as client:
            assert await spend(client, 2, {}) == [401, 429]
            for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/"):
                assert (await client.get(path)).status_code == 200, path


@pytest.mark.redis
class TestRestLimitAcrossInstances:
    async def test_two_instances_share_one_bucket(
        self, api: ApiFactory, redis: RedisServer
    ) -> None:
        settings = {
            "broadcast_url": redis.url,
            "producer": "off",
            "rest_rate_per_second": 0.1,
            "rest_rate_burst": 4,
        }
        async with api(**settings) as first, api(**settings) as second:
            assert await spend(first, 4, bearer()) == [200] * 4
            refused = await second.get("/v1/symbols", headers=bearer())
            other = await second.get("/v1/symbols", headers=bearer("someone-else"))

        assert refused.status_code == 429  # the second instance sees the first's spending
        assert refused.headers["Retry-After"] == "10"
        assert other.status_code == 200


async def test_an_unreachable_redis_lets_requests_through(
    api: ApiFactory, caplog: pytest.LogCaptureFixture
) -> None:
    demo = {"grant_type": "client_credentials", "client_id": "demo", "client_secret": "demo-secret"}
    async with api(broadcast_url=f"redis://127.0.0.1:{free_port()}/0", producer="off") as client:
        symbols = [
            (await client.get("/v1/symbols", headers=bearer())).status_code for _ in range(3)
        ]
        issued = await client.post("/v1/auth/token", data=demo)

    assert symbols == [200] * 3 and issued.status_code == 200
    warnings = [r.getMessage() for r in caplog.records if "not checked" in r.getMessage()]
    assert len(warnings) == 3  # one per limit (rest, token per address and per client_id)


class TestBuckets:
    async def test_memory_buckets_refill_up_to_the_burst(self) -> None:
        buckets = MemoryBuckets()
        waits = [await buckets.take("k", rate=1000, burst=2) for _ in range(3)]
        assert waits[:2] == [0.0, 0.0] and 0 < waits[2] <= 0.001

    @pytest.mark.redis
    async def test_redis_buckets_expire_when_idle(self, redis: RedisServer) -> None:
        client = create_redis(redis.url)
        try:
            buckets = RedisBuckets(client, prefix="t")
            assert await buckets.take("k", rate=2, burst=2) == 0.0
            ttl_ms = await client.pttl("t:rate:k")
            assert await buckets.take("k", rate=2, burst=2) == 0.0
            wait = await buckets.take("k", rate=2, burst=2)
        finally:
            await client.aclose()
        assert 0 < ttl_ms <= 2000  # a full refill (1 s) and a second's margin
        assert 0.4 < wait <= 0.5

    def test_retry_after_is_whole_seconds_at_least_one(self) -> None:
        assert [retry_after(w) for w in (0.001, 1.0, 1.2, 9.99)] == [1, 1, 2, 10]
