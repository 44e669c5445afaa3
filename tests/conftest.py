from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import uvloop
from fastapi import FastAPI
from redis.asyncio import Redis

from app.main import create_app
from app.prices.asyncapi import build_asyncapi
from app.server.run import raise_fd_limit
from tests import frames
from tests.support import (
    LiveApp,
    RedisServer,
    make_settings,
    migrate,
    redis_server,
    serve_in_process,
)

PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
FRAME_PROBLEMS = pytest.StashKey[list[str]]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Every frame shape the run's WebSocket clients received must be one /asyncapi.json
    allows, and one the SDK parses (tests/frames.py): else the run fails. Under pytest-xdist
    a worker hands its frames to the controller (pytest_testnodedown), which checks them all."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["frames"] = frames.recorded()
        return
    seen = frames.recorded()
    found = frames.problems(build_asyncapi("test"), seen) if seen else []
    session.config.stash[FRAME_PROBLEMS] = found
    if found and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """An xdist worker is done: keep the frames it received for the check at the end."""
    for channel, body in getattr(node, "workeroutput", {}).get("frames", []):
        frames.record(channel, body)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    found = config.stash.get(FRAME_PROBLEMS, [])
    if found:
        terminalreporter.section("frames the spec (/asyncapi.json) does not allow", red=True)
        for line in found:
            terminalreporter.write_line(line)
    elif frames.recorded():
        terminalreporter.write_line(
            f"{len(frames.recorded())} frames of every shape received: as /asyncapi.json says"
        )


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Tests marked `both_loops` run on asyncio's loop and on uvloop (what `python -m app`
    runs): the code they test writes around the loop's transports. The rest: asyncio's."""
    if item.get_closest_marker("both_loops"):
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture(scope="session", autouse=True)
def open_file_limit() -> None:
    """As `python -m app` does: the soft open-file limit up to the hard one, so that the fan-out
    has descriptors to spare for its direct sends (app/prices/lanes.py: direct_limit)."""
    raise_fd_limit()


@pytest.fixture(scope="session")
def migrated_db_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`alembic upgrade head` once; each test gets a copy of the result."""
    path = tmp_path_factory.mktemp("db") / "template.db"
    migrate(f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture
def database_url(migrated_db_template: Path, tmp_path: Path) -> str:
    path = tmp_path / "pricefeed.db"
    shutil.copy(migrated_db_template, path)
    return f"sqlite+aiosqlite:///{path}"


@pytest.fixture
def build_app(database_url: str) -> Callable[..., FastAPI]:
    def build(**overrides: Any) -> FastAPI:
        url = overrides.pop("database_url", database_url)
        return create_app(make_settings(url, **overrides))

    return build


@asynccontextmanager
async def _in_memory_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """httpx over ASGI, with the lifespan run and its state passed to requests (httpx's
    ASGI transport runs no lifespan itself)."""
    async with app.router.lifespan_context(app) as state:

        async def with_state(scope: Any, receive: Any, send: Any) -> None:
            scope["state"] = dict(state or {})
            await app(scope, receive, send)

        transport = httpx.ASGITransport(app=with_state)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client


@pytest.fixture
def api(
    build_app: Callable[..., FastAPI],
) -> Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]:
    """`async with api(**settings) as client:` a REST client on an in-process app."""

    def open_client(**overrides: Any) -> AbstractAsyncContextManager[httpx.AsyncClient]:
        return _in_memory_client(build_app(**overrides))

    return open_client


@pytest.fixture
def ws_impl() -> str:
    """The WebSocket protocol of `live` servers (SERVER_VARIANTS parametrizes it)."""
    return "fast"


@pytest.fixture
def fanout_direct_writes() -> bool:
    """Whether `live` servers' hub writes to sockets directly (SERVER_VARIANTS parametrizes it)."""
    return True


@pytest.fixture
async def client(
    api: Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]],
) -> AsyncIterator[httpx.AsyncClient]:
    """A REST client on an in-process app with the default test settings."""
    async with api() as rest:
        yield rest


@pytest.fixture(scope="module")
def openapi() -> dict[str, Any]:
    """The schema `/openapi.json` serves (tests/test_docs.py checks they are the same); building
    it needs no database, so it is built once per module."""
    return create_app(make_settings("sqlite+aiosqlite:///./unused-by-the-schema.db")).openapi()


@pytest.fixture
def live(
    build_app: Callable[..., FastAPI], ws_impl: str, fanout_direct_writes: bool
) -> Callable[..., AbstractAsyncContextManager[LiveApp]]:
    """`async with live(**settings) as server:` a real uvicorn server in this loop, on the
    protocol app/server/guard.py resolves for `ws_impl`."""

    def start(**overrides: Any) -> AbstractAsyncContextManager[LiveApp]:
        overrides.setdefault("ws_impl", ws_impl)
        overrides.setdefault("fanout_direct_writes", fanout_direct_writes)
        return serve_in_process(build_app(**overrides))

    return start


@asynccontextmanager
async def fresh_postgres_database() -> AsyncIterator[str]:
    """A fresh (empty) database with a random name on the local PostgreSQL, dropped afterwards
    (skips the test when PostgreSQL is unreachable, outside CI)."""
    try:
        admin = await asyncpg.connect(PG_ADMIN_DSN, timeout=3)
    except (OSError, asyncpg.PostgresError) as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL on 127.0.0.1:5432 is unreachable in CI: {exc!r}")
        pytest.skip(f"PostgreSQL on 127.0.0.1:5432 is unreachable: {exc!r}")
    name = f"pricefeed_test_{uuid.uuid4().hex[:12]}"
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """A fresh (empty) database with a random name on the local PostgreSQL, dropped afterwards."""
    async with fresh_postgres_database() as url:
        yield url


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, on a free port, that the test may kill and restart."""
    with redis_server() as server:
        yield server


@pytest.fixture
async def redis_client(redis: RedisServer) -> AsyncIterator[Redis]:
    """A redis-py client of the test's own `redis`, closed afterwards."""
    client = Redis.from_url(redis.url)
    yield client
    await client.aclose()
