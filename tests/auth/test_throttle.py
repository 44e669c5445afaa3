"""app/auth/throttle.py: the token endpoint limited per client address and per client_id
(429), its secret checks capped (503), and unknown client ids costing no check: a real server,
with senders on distinct loopback addresses (127.0.0.1 and 127.0.0.2)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import httpx

from app.auth.service import upsert_client
from app.db import create_engine, create_session_factory
from tests.support import LiveApp

LiveFactory = Callable[..., AbstractAsyncContextManager[LiveApp]]
UNLIMITED = {"token_rate_per_minute": 1_000_000, "token_rate_burst": 10_000}


async def add_client(database_url: str, client_id: str, secret: str) -> None:
    engine = create_engine(database_url)
    try:
        async with create_session_factory(engine)() as session:
            await upsert_client(
                session, client_id=client_id, name=client_id, secret=secret, symbols=["*"]
            )
    finally:
        await engine.dispose()


@asynccontextmanager
async def from_address(server: LiveApp, address: str) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.AsyncHTTPTransport(local_address=address)
    async with httpx.AsyncClient(base_url=server.http, transport=transport, timeout=30) as client:
        yield client


async def request_token(client: httpx.AsyncClient, client_id: str, secret: str) -> httpx.Response:
    form = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret}
    return await client.post("/v1/auth/token", data=form)


class TestRateLimits:
    async def test_a_guessing_address_gets_429_while_others_get_their_tokens(
        self, live: LiveFactory, database_url: str
    ) -> None:
        await add_client(database_url, "desk", "desk-secret")
        async with (
            live(token_rate_per_minute=6, token_rate_burst=5) as server,
            from_address(server, "127.0.0.1") as guesser,
            from_address(server, "127.0.0.2") as desk,
        ):
            guesses = await asyncio.gather(
                *(request_token(guesser, "demo", f"guess-{i}") for i in range(30))
            )
            renewal = await request_token(desk, "desk", "desk-secret")
            demo_elsewhere = await request_token(desk, "demo", "demo-secret")

        assert Counter(r.status_code for r in guesses) == {401: 5, 429: 25}
        refused = next(r for r in guesses if r.status_code == 429)
        assert refused.json() == {
            "detail": "too many requests for this client address; retry later",
            "code": "rate_limited",
        }
        assert refused.headers["Retry-After"] == "10"  # a request every 10 s at 6 a minute
        assert renewal.status_code == 200
        # the guessed client_id is limited from every address
        assert demo_elsewhere.status_code == 429
        assert (
            demo_elsewhere.json()["detail"] == "too many requests for this client_id; retry later"
        )


class TestSecretChecks:
    async def test_checks_past_the_cap_get_503_with_retry_after(self, live: LiveFactory) -> None:
        async with (
            live(
                **UNLIMITED, token_max_concurrent_checks=1, token_check_wait_seconds=0.1
            ) as server,
            from_address(server, "127.0.0.1") as sender,
        ):
            answers = await asyncio.gather(
                *(request_token(sender, "demo", f"guess-{i}") for i in range(30))
            )

        statuses = Counter(r.status_code for r in answers)
        assert set(statuses) == {401, 503}, statuses
        busy = next(r for r in answers if r.status_code == 503)
        assert busy.json()["code"] == "unavailable" and busy.headers["Retry-After"] == "1"

    async def test_anonymous_senders_do_not_slow_a_renewal(
        self, live: LiveFactory, database_url: str
    ) -> None:
        """Unknown client ids run no scrypt and take no check slot: a renewal amid 200 of them
        gets its check (before: it queued behind their 200 checks for the one slot, and with a
        0.5 s wait for a slot it was refused 503, as were most of the strangers)."""
        await add_client(database_url, "desk", "desk-secret")
        async with (
            live(
                **UNLIMITED, token_max_concurrent_checks=1, token_check_wait_seconds=0.5
            ) as server,
            from_address(server, "127.0.0.1") as strangers,
            from_address(server, "127.0.0.2") as desk,
        ):
            flood = [request_token(strangers, f"stranger-{i}", "x") for i in range(200)]
            flooding = asyncio.gather(*flood)
            await asyncio.sleep(0.2)  # the flood is in flight
            renewal = await request_token(desk, "desk", "desk-secret")
            answers = await flooding

        assert {r.status_code for r in answers} == {401}  # no stranger took a check slot
        assert renewal.status_code == 200, renewal.text
