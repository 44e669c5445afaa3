"""`python -m app.admin revoke`: a revoked token is refused (401, 4401), and the streams it
opened close with 4401 within 5 s, on every instance that shares the database."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from app.auth.revocations import Revocations, revoke
from app.db import create_engine, create_session_factory
from app.security import Principal
from tests.support import ROOT, TEST_ENV, LiveApp, Stream, open_stream, token

Live = Callable[..., AbstractAsyncContextManager[LiveApp]]


def jti_of(jwt: str) -> str:
    body = jwt.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return str(claims["jti"])


def admin_revoke(database_url: str, *args: str) -> None:
    env = {**os.environ, **TEST_ENV, "DATABASE_URL": database_url}
    done = subprocess.run(
        [sys.executable, "-m", "app.admin", "revoke", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


async def rest_status(server: LiveApp, bearer: str) -> int:
    async with httpx.AsyncClient(base_url=server.http) as http:
        answer = await http.get("/v1/prices/AAPL", headers={"Authorization": f"Bearer {bearer}"})
        return answer.status_code


async def subscribed(stream: Stream) -> Stream:
    await stream.recv_type("snapshot")
    return stream


def test_every_token_we_issue_has_its_own_jti() -> None:
    assert jti_of(token()) != jti_of(token())


async def test_revoke_closes_the_open_stream_and_refuses_the_token(
    live: Live, database_url: str
) -> None:
    revoked, kept = token("alice"), token("alice")
    async with live() as server:
        async with (
            open_stream(f"{server.ws}/v1/ws/prices/AAPL?token={revoked}") as doomed,
            open_stream(f"{server.ws}/v1/ws/prices/AAPL?token={kept}") as other,
        ):
            await subscribed(doomed)
            await subscribed(other)
            assert await rest_status(server, revoked) == 200

            await asyncio.to_thread(admin_revoke, database_url, "--jti", jti_of(revoked))
            started = time.monotonic()
            code, _ = await doomed.closed_with(timeout=5)
            assert code == 4401
            assert time.monotonic() - started < 5

            assert await rest_status(server, revoked) == 401
            assert await rest_status(server, kept) == 200  # another token of the same subject
            await other.recv_type("tick")  # its stream goes on
        with pytest.raises(ConnectionClosed) as refused:
            async with open_stream(f"{server.ws}/v1/ws/prices/AAPL?token={revoked}") as again:
                await again.recv_type("snapshot")
        assert refused.value.rcvd is not None and refused.value.rcvd.code == 4401


async def test_revoke_ends_an_sse_stream_with_an_unauthenticated_error(
    live: Live, database_url: str
) -> None:
    bearer = token("erin")
    async with (
        live(revocation_poll_seconds=0.5) as server,
        httpx.AsyncClient(base_url=server.http, timeout=10) as http,
        http.stream(
            "GET", "/v1/stream?symbols=AAPL", headers={"Authorization": f"Bearer {bearer}"}
        ) as response,
    ):
        assert response.status_code == 200
        lines = response.aiter_lines()
        await asyncio.wait_for(anext(lines), 5)  # it streams
        await asyncio.to_thread(admin_revoke, database_url, "--jti", jti_of(bearer))

        async def until_error() -> str:
            async for line in lines:
                if line == "event: error":
                    return await anext(lines)
            raise AssertionError("the stream ended without an error event")

        data = json.loads((await asyncio.wait_for(until_error(), 5)).removeprefix("data: "))
        assert data == {"code": "unauthenticated", "message": "token revoked"}


async def test_two_instances_on_one_database_both_close_a_revoked_subject(
    live: Live, database_url: str
) -> None:
    bearer = token("bob")
    async with AsyncExitStack() as stack:
        servers = [
            await stack.enter_async_context(live(revocation_poll_seconds=0.5)) for _ in range(2)
        ]
        streams = [
            await subscribed(
                await stack.enter_async_context(
                    open_stream(f"{s.ws}/v1/ws/prices/AAPL?token={bearer}")
                )
            )
            for s in servers
        ]
        await asyncio.to_thread(admin_revoke, database_url, "--sub", "bob")
        closes = await asyncio.gather(*(s.closed_with(timeout=5) for s in streams))
        assert [code for code, _ in closes] == [4401, 4401]
        assert [await rest_status(s, bearer) for s in servers] == [401, 401]


async def test_a_subject_revocation_spares_tokens_issued_after_it(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        sessions = create_session_factory(engine)
        closed: list[object] = []

        async def on_revoked(picked: object) -> None:
            closed.append(picked)

        revocations = Revocations(sessions, poll_seconds=1, on_revoked=on_revoked)
        before = Principal("carol", frozenset("*"), time.time() + 60, "a", time.time() - 1)
        untimed = Principal("carol", frozenset("*"), time.time() + 60, "b", None)
        async with sessions() as session:
            await revoke(session, subject="carol")
        after = Principal("carol", frozenset("*"), time.time() + 60, "c", time.time() + 1)
        assert await revocations.refresh() is True
        assert revocations.is_revoked(before) and revocations.is_revoked(untimed)
        assert not revocations.is_revoked(after)
        assert await revocations.refresh() is False  # nothing new: no streams to close again
        async with sessions() as session:  # past keep_until: forgotten
            await revoke(session, jti="old", keep_seconds=-1)
        assert await revocations.refresh() is False
        assert not revocations.is_revoked(Principal("dan", frozenset("*"), 0, "old"))
    finally:
        await engine.dispose()
