"""alembic/: the schema goes up, down and up again, on SQLite and on PostgreSQL, and leaves the
seed instruments behind."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import asyncpg
import pytest

from tests.support import ROOT

SEEDS = {
    "AAPL": "equity",
    "MSFT": "equity",
    "GOOGL": "equity",
    "AMZN": "equity",
    "TSLA": "equity",
    "BTC-USD": "crypto",
    "ETH-USD": "crypto",
    "SOL-USD": "crypto",
    "EUR-USD": "fx",
    "GBP-USD": "fx",
}
APP_TABLES = {"instruments", "api_clients", "revoked_tokens", "ticks", "candles"}


def alembic(database_url: str, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    done = subprocess.run(
        [sys.executable, "-m", "alembic", "-x", f"url={database_url}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"alembic {' '.join(args)} failed:\n{done.stderr}"


def assert_seeded(instruments: dict[str, str]) -> None:
    assert instruments == SEEDS
    assert {instruments["AAPL"], instruments["BTC-USD"], instruments["EUR-USD"]} == {
        "equity",
        "crypto",
        "fx",
    }


class TestSqlite:
    @staticmethod
    def instruments(path: Path) -> dict[str, str]:
        with closing(sqlite3.connect(path)) as conn:
            rows = conn.execute("SELECT symbol, asset_class FROM instruments WHERE active")
            return dict(rows.fetchall())

    @staticmethod
    def tables(path: Path) -> set[str]:
        with closing(sqlite3.connect(path)) as conn:
            rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            return {name for (name,) in rows.fetchall()}

    def test_upgrade_downgrade_upgrade(self, tmp_path: Path) -> None:
        path = tmp_path / "fresh.db"
        url = f"sqlite+aiosqlite:///{path}"

        alembic(url, "upgrade", "head")
        assert APP_TABLES <= self.tables(path)
        assert_seeded(self.instruments(path))

        alembic(url, "downgrade", "base")
        assert not APP_TABLES & self.tables(path)

        alembic(url, "upgrade", "head")
        assert_seeded(self.instruments(path))


@pytest.mark.postgres
class TestPostgres:
    @staticmethod
    async def read(url: str) -> tuple[set[str], dict[str, str]]:
        conn = await asyncpg.connect(
            url.replace("postgresql+asyncpg://", "postgresql://"), timeout=3
        )
        try:
            tables = {
                r["tablename"]
                for r in await conn.fetch(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                )
            }
            instruments: dict[str, str] = {}
            if "instruments" in tables:
                rows = await conn.fetch("SELECT symbol, asset_class FROM instruments WHERE active")
                instruments = {r["symbol"]: r["asset_class"] for r in rows}
        finally:
            await conn.close()
        return tables, instruments

    async def test_upgrade_downgrade_upgrade(self, postgres_url: str) -> None:
        alembic(postgres_url, "upgrade", "head")
        tables, instruments = await self.read(postgres_url)
        assert APP_TABLES <= tables
        assert_seeded(instruments)

        alembic(postgres_url, "downgrade", "base")
        tables, _ = await self.read(postgres_url)
        assert not APP_TABLES & tables

        alembic(postgres_url, "upgrade", "head")
        tables, instruments = await self.read(postgres_url)
        assert APP_TABLES <= tables
        assert_seeded(instruments)

    async def test_the_service_runs_on_postgres(self, postgres_url: str, api) -> None:
        """Not only the schema: tokens (api clients) and instruments come from PostgreSQL."""
        alembic(postgres_url, "upgrade", "head")
        async with api(database_url=postgres_url) as client:
            issued = await client.post(
                "/v1/auth/token",
                data={
                    "grant_type": "client_credentials",
                    "client_id": "demo",
                    "client_secret": "demo-secret",
                },
            )
            assert issued.status_code == 200
            headers = {"Authorization": f"Bearer {issued.json()['access_token']}"}
            symbols = await client.get("/v1/symbols", headers=headers)
            assert {s["symbol"] for s in symbols.json()} == set(SEEDS)
            assert (await client.get("/readyz")).json()["checks"]["database"] == "ok"
