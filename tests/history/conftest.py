"""History tests run on SQLite and on the local PostgreSQL alike, each migrated by Alembic;
`outage` takes the database away for real (and gives it back)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from tests.conftest import PG_ADMIN_DSN, fresh_postgres_database
from tests.support import migrate, sqlite_locked


@dataclass
class HistoryDatabase:
    url: str
    engine: AsyncEngine
    outage: Callable[[], AbstractAsyncContextManager[None]]


@contextlib.asynccontextmanager
async def _postgres_refusing(name: str) -> AsyncIterator[None]:
    """The database refuses connections, and the open ones are cut."""
    admin = await asyncpg.connect(PG_ADMIN_DSN, timeout=3)
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        yield
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def history_db(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[HistoryDatabase]:  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        path = str(tmp_path / "history.db")
        url = f"sqlite+aiosqlite:///{path}"
        migrate(url)
        # A short busy timeout: a locked database fails a write in 0.2 s, not 5.
        engine = create_async_engine(url, connect_args={"timeout": 0.2})
        database = HistoryDatabase(url, engine, lambda: sqlite_locked(path))
        try:
            yield database
        finally:
            await engine.dispose()
        return
    async with fresh_postgres_database() as url:
        migrate(url)
        engine = create_async_engine(url, pool_pre_ping=True, connect_args={"timeout": 2})
        name = url.rsplit("/", 1)[1]
        try:
            yield HistoryDatabase(url, engine, lambda: _postgres_refusing(name))
        finally:
            await engine.dispose()
