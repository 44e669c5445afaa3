"""app/auth/routes.py: `POST /v1/auth/token`, and the operator commands in app/admin.py that
create clients and sign tokens."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
import pytest

from app.security import InvalidToken
from tests.support import JWT_SECRET, ROOT, TEST_ENV, free_port, migrate, signer, token

ApiFactory = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]

DEMO = {"grant_type": "client_credentials", "client_id": "demo", "client_secret": "demo-secret"}


def run_admin(*args: str, database_url: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m app.admin …` as an operator would."""
    return subprocess.run(
        [sys.executable, "-m", "app.admin", *args],
        cwd=ROOT,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("PRICEFEED_")},
            **TEST_ENV,
            "DATABASE_URL": database_url,
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


def admin(*args: str, database_url: str) -> str:
    """Run `python -m app.admin …`, which must succeed; its stdout."""
    done = run_admin(*args, database_url=database_url)
    assert done.returncode == 0, done.stderr
    return done.stdout


async def request_token(client: httpx.AsyncClient, client_id: str, secret: str) -> httpx.Response:
    return await client.post(
        "/v1/auth/token",
        data={"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret},
    )


def parse_lines(output: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


class TestIssueToken:
    async def test_demo_client_gets_a_bearer_token(self, api: ApiFactory) -> None:
        async with api() as client:
            response = await client.post("/v1/auth/token", data=DEMO)

        assert response.status_code == 200
        body = response.json()
        assert set(body) == {"access_token", "token_type", "expires_in"}
        assert body["token_type"] == "bearer"
        assert isinstance(body["expires_in"], int) and body["expires_in"] > 0
        principal = signer().verify(body["access_token"])
        assert principal.subject == "demo"

    async def test_token_opens_the_api(self, api: ApiFactory) -> None:
        async with api() as client:
            issued = (await client.post("/v1/auth/token", data=DEMO)).json()["access_token"]
            response = await client.get(
                "/v1/symbols", headers={"Authorization": f"Bearer {issued}"}
            )

        assert response.status_code == 200
        assert any(item["symbol"] == "AAPL" for item in response.json())

    async def test_expires_in_follows_the_configured_ttl(self, api: ApiFactory) -> None:
        async with api(jwt_ttl_seconds=120) as client:
            body = (await client.post("/v1/auth/token", data=DEMO)).json()

        assert body["expires_in"] == 120
        principal = signer().verify(body["access_token"])
        issued_at = principal.expires_at - 120
        assert abs(issued_at - time.time()) < 10

    @pytest.mark.parametrize(
        "form",
        [
            pytest.param({**DEMO, "client_secret": "not-the-secret"}, id="wrong-secret"),
            pytest.param({**DEMO, "client_id": "nobody"}, id="unknown-client"),
            pytest.param({**DEMO, "client_id": "DEMO"}, id="client-id-is-case-sensitive"),
        ],
    )
    async def test_bad_credentials_are_401(self, api: ApiFactory, form: dict[str, str]) -> None:
        async with api() as client:
            response = await client.post("/v1/auth/token", data=form)

        assert response.status_code == 401
        assert "access_token" not in response.text

    @pytest.mark.parametrize(
        "form",
        [
            pytest.param({}, id="empty"),
            pytest.param({k: v for k, v in DEMO.items() if k != "grant_type"}, id="no-grant-type"),
            pytest.param({k: v for k, v in DEMO.items() if k != "client_id"}, id="no-client-id"),
            pytest.param(
                {k: v for k, v in DEMO.items() if k != "client_secret"}, id="no-client-secret"
            ),
            pytest.param({**DEMO, "grant_type": "password"}, id="grant-type-password"),
            pytest.param({**DEMO, "client_id": ""}, id="empty-client-id"),
        ],
    )
    async def test_malformed_request_is_422(self, api: ApiFactory, form: dict[str, str]) -> None:
        async with api() as client:
            response = await client.post("/v1/auth/token", data=form)

        assert response.status_code == 422

    async def test_json_body_is_422_not_500(self, api: ApiFactory) -> None:
        async with api() as client:
            response = await client.post("/v1/auth/token", json=DEMO)

        assert response.status_code == 422

    async def test_demo_client_is_not_seeded_in_prod(self, api: ApiFactory) -> None:
        async with api(env="prod", demo_client_secret="a-prod-demo-secret-0123456789") as client:
            response = await client.post(
                "/v1/auth/token", data={**DEMO, "client_secret": "a-prod-demo-secret-0123456789"}
            )

        assert response.status_code == 401

    async def test_prod_starts_with_the_default_demo_secret_and_it_opens_nothing(
        self, api: ApiFactory
    ) -> None:
        """ENV=prod with a strong JWT_SECRET alone: the demo client's secret is not asked for,
        and its public default is no way in."""
        async with api(env="prod") as client:
            response = await client.post("/v1/auth/token", data=DEMO)

        assert response.status_code == 401
        assert response.json()["code"] == "unauthenticated"

    async def test_prod_disables_the_demo_client_a_dev_run_left(
        self, api: ApiFactory, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A dev run seeded `demo`/`demo-secret` in this database; prod starts on it."""
        async with api() as client:
            assert (await client.post("/v1/auth/token", data=DEMO)).status_code == 200
        caplog.set_level(logging.INFO, logger="app")

        for _ in range(2):  # a second prod start finds it disabled already: no second line
            async with api(env="prod") as client:
                response = await client.post("/v1/auth/token", data=DEMO)
                board = await client.get("/")

            assert response.status_code == 401
            assert response.json()["code"] == "unauthenticated"
            assert "demo-secret" not in board.text
        disabled = [r for r in caplog.records if "demo client" in r.getMessage()]
        assert [r.getMessage() for r in disabled] == [
            "ENV=prod: disabled the demo client 'demo' a dev run left in the database"
        ]
        assert disabled[0].levelno == logging.WARNING

    async def test_a_dev_run_after_prod_enables_the_demo_client_again(
        self, api: ApiFactory
    ) -> None:
        async with api(env="prod"), api() as client:
            response = await client.post("/v1/auth/token", data=DEMO)

        assert response.status_code == 200


class TestAdminAddClient:
    async def test_new_client_gets_a_token_with_its_symbols(
        self, api: ApiFactory, database_url: str
    ) -> None:
        output = admin(
            "add-client",
            "--id",
            "desk-1",
            "--symbols",
            "aapl,MSFT",
            "--name",
            "Desk 1",
            database_url=database_url,
        )
        created = parse_lines(output)
        assert created["client_id"] == "desk-1"
        secret = created["client_secret"]

        async with api() as client:
            response = await request_token(client, "desk-1", secret)
            wrong = await request_token(client, "desk-1", secret + "x")

        assert response.status_code == 200
        principal = signer().verify(response.json()["access_token"])
        assert principal.subject == "desk-1"
        assert principal.symbols == frozenset({"AAPL", "MSFT"})
        assert wrong.status_code == 401

    async def test_rerun_rotates_the_secret(self, api: ApiFactory, database_url: str) -> None:
        rerun = ("add-client", "--id", "desk-2", "--symbols", "*")
        first = parse_lines(admin(*rerun, database_url=database_url))
        second = parse_lines(admin(*rerun, database_url=database_url))
        assert first["client_secret"] != second["client_secret"]

        async with api() as client:
            old = await request_token(client, "desk-2", first["client_secret"])
            new = await request_token(client, "desk-2", second["client_secret"])

        assert old.status_code == 401
        assert new.status_code == 200
        assert signer().verify(new.json()["access_token"]).all_symbols


class TestAdminScopes:
    """A feeder: `add-client --scopes publish` → its token carries `scope` → it may push."""

    async def test_a_client_with_publish_pushes_and_one_without_gets_403(
        self, api: ApiFactory, database_url: str
    ) -> None:
        feeder = parse_lines(
            admin("add-client", "--id", "feeder", "--scopes", "publish", database_url=database_url)
        )
        desk = parse_lines(
            admin("add-client", "--id", "desk", "--symbols", "*", database_url=database_url)
        )
        body = {"quotes": [{"symbol": "AAPL", "price": "190.5"}]}

        async with api(feed_source="ingest") as client:
            issued = (await request_token(client, "feeder", feeder["client_secret"])).json()
            as_desk = (await request_token(client, "desk", desk["client_secret"])).json()
            pushed = await client.post(
                "/v1/ingest",
                json=body,
                headers={"Authorization": f"Bearer {issued['access_token']}"},
            )
            refused = await client.post(
                "/v1/ingest",
                json=body,
                headers={"Authorization": f"Bearer {as_desk['access_token']}"},
            )

        assert claims_of(issued["access_token"])["scope"] == "publish"
        assert claims_of(issued["access_token"])["symbols"] == []
        assert "scope" not in claims_of(as_desk["access_token"])
        assert (pushed.status_code, pushed.json()) == (202, {"accepted": 1})
        assert refused.status_code == 403
        assert refused.json()["code"] == "forbidden"

    def test_an_unknown_scope_is_refused(self, database_url: str) -> None:
        done = run_admin("add-client", "--id", "f", "--scopes", "write", database_url=database_url)

        assert done.returncode == 2
        assert "not a list of scopes (publish): 'write'" in done.stderr
        assert done.stdout == ""

    def test_the_token_command_takes_scopes(self, database_url: str) -> None:
        output = admin("token", "--sub", "feeder", "--scopes", "publish", database_url=database_url)

        principal = signer().verify(output.strip())
        assert principal.scopes == frozenset({"publish"})
        assert principal.symbols == frozenset()


def claims_of(jwt: str) -> dict[str, Any]:
    """A token's claims, read without the library under test."""
    body = jwt.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return claims


class TestAdminToken:
    def test_printed_token_verifies(self, database_url: str) -> None:
        output = admin("token", "--sub", "x", "--symbols", "AAPL", database_url=database_url)

        principal = signer().verify(output.strip())

        assert principal.subject == "x"
        assert principal.symbols == frozenset({"AAPL"})

    def test_printed_token_is_signed_with_jwt_secret(self, database_url: str) -> None:
        output = admin(
            "token", "--sub", "x", "--symbols", "*", "--ttl", "60", database_url=database_url
        )

        assert signer().verify(output.strip()).subject == "x"
        with pytest.raises(InvalidToken):
            signer(secret=JWT_SECRET[::-1]).verify(output.strip())


class TestAdminNeedsSymbols:
    """Every symbol (`*`) is written out by the operator, never the default of an omission."""

    @pytest.mark.parametrize(
        "args",
        [
            pytest.param(("add-client", "--id", "desk-3"), id="add-client"),
            pytest.param(("token", "--sub", "x"), id="token"),
        ],
    )
    def test_without_symbols_it_exits_nonzero_and_says_why(
        self, database_url: str, args: tuple[str, ...]
    ) -> None:
        done = run_admin(*args, database_url=database_url)

        assert done.returncode == 2
        assert "give --symbols (what it may read), --scopes" in done.stderr
        assert done.stdout == ""  # no secret, no token

    def test_prod_refuses_to_create_the_demo_client(self, database_url: str) -> None:
        done = run_admin(
            "add-client", "--id", "demo", "--symbols", "*",
            database_url=database_url, ENV="prod", JWT_SECRET=JWT_SECRET,
        )  # fmt: skip

        assert done.returncode == 2
        assert "DEMO_CLIENT_ID" in done.stderr and "client_secret" not in done.stdout


class TestDatabaseOutage:
    """The token endpoint with its database gone: a 503 the client can retry, in the shape of
    every error, and one log line for the outage rather than a traceback per request."""

    @staticmethod
    async def until_the_feed_ticks(client: httpx.AsyncClient) -> None:
        """The app's producer has resumed (reading the database too) and published: an outage
        before that is the producer's, which cannot resume and logs an ERROR (under load, the
        first token can be issued before the producer leads)."""
        reader = {"Authorization": f"Bearer {token()}"}
        async with asyncio.timeout(20):
            while (await client.get("/v1/prices/AAPL", headers=reader)).status_code != 200:
                await asyncio.sleep(0.05)

    @staticmethod
    def assert_outage_answered(
        responses: list[httpx.Response], caplog: pytest.LogCaptureFixture
    ) -> None:
        for response in responses:
            assert response.status_code == 503
            assert response.headers["content-type"] == "application/json"
            assert response.json() == {
                "detail": "database unavailable; retry shortly",
                "code": "unavailable",
            }
            assert response.headers["retry-after"] == "5"
        lines = [r for r in caplog.records if "database unavailable" in r.getMessage()]
        assert len(lines) == 1, [r.getMessage() for r in lines]
        assert lines[0].levelno == logging.WARNING and lines[0].exc_info is None
        assert "\n" not in lines[0].getMessage()
        assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []

    async def test_sqlite_file_destroyed(
        self, api: ApiFactory, database_url: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        path = database_url.removeprefix("sqlite+aiosqlite:///")
        async with api() as client:
            assert (await client.post("/v1/auth/token", data=DEMO)).status_code == 200
            await self.until_the_feed_ticks(client)
            with open(path, "r+b") as db:  # the same file, under the open connection
                db.write(b"\xff" * 4096)
            caplog.clear()
            responses = [await client.post("/v1/auth/token", data=DEMO) for _ in range(3)]

        self.assert_outage_answered(responses, caplog)

    @pytest.mark.postgres
    async def test_postgres_unreachable(
        self, api: ApiFactory, postgres_url: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """PostgreSQL behind a TCP hop that goes away: refused, as a database host that is
        down; back, and tokens are issued again."""
        await asyncio.to_thread(migrate, postgres_url)
        hop = TcpHop(free_port(), target=5432)
        await hop.open()
        try:
            async with api(database_url=hop.url(postgres_url)) as client:
                assert (await client.post("/v1/auth/token", data=DEMO)).status_code == 200
                await self.until_the_feed_ticks(client)
                await hop.close()  # the database goes away
                caplog.clear()
                responses = [await client.post("/v1/auth/token", data=DEMO) for _ in range(3)]
                self.assert_outage_answered(responses, caplog)

                await hop.open()  # and comes back
                assert (await client.post("/v1/auth/token", data=DEMO)).status_code == 200
        finally:
            await hop.close()

    @pytest.mark.postgres
    async def test_postgres_silent(
        self, api: ApiFactory, postgres_url: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A partition: the database neither answers nor refuses. The token endpoint answers
        503 within DATABASE_TIMEOUT_SECONDS (a query, then a new connection), not after
        asyncpg's default of a minute per connection attempt."""
        await asyncio.to_thread(migrate, postgres_url)
        hop = TcpHop(free_port(), target=5432)
        await hop.open()
        try:
            async with api(
                database_url=hop.url(postgres_url), database_timeout_seconds=0.5
            ) as client:
                assert (await client.post("/v1/auth/token", data=DEMO)).status_code == 200
                await self.until_the_feed_ticks(client)
                hop.freeze()
                caplog.clear()

                async def two_requests() -> list[httpx.Response]:
                    return [await client.post("/v1/auth/token", data=DEMO) for _ in range(2)]

                # Each: the pooled connection's ping times out, then a new connection's attempt.
                responses = await asyncio.wait_for(two_requests(), timeout=10)
                self.assert_outage_answered(responses, caplog)
                await hop.close()  # the app's shutdown has nothing to wait for
        finally:
            await hop.close()


class TcpHop:
    """127.0.0.1:`port` forwarded to 127.0.0.1:`target` while open; `close` stops listening
    and cuts every connection it carried; `freeze` keeps every connection, and takes new ones,
    but carries nothing more (a network partition: no answer, no error)."""

    def __init__(self, port: int, *, target: int) -> None:
        self.port, self.target = port, target
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.frozen = False

    def freeze(self) -> None:
        self.frozen = True
        for writer in self.writers:
            writer.transport.pause_reading()

    def url(self, database_url: str) -> str:
        return database_url.replace(f"127.0.0.1:{self.target}", f"127.0.0.1:{self.port}")

    async def open(self) -> None:
        self.server = await asyncio.start_server(self._forward, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in self.writers:
                writer.transport.abort()
            self.writers.clear()
            await self.server.wait_closed()
            self.server = None
        self.frozen = False

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.frozen:
            self.writers.append(writer)  # held open, never answered
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self.writers += (writer, up_writer)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()
