"""The catalog watcher on a real database: what it applies, and how it rides out a database
that fails (it keeps the instruments it knows, says so once, and catches up afterwards)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from decimal import Decimal

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.db import create_engine, create_session_factory
from app.instruments.catalog import Catalog, CatalogChange
from app.instruments.repository import load_instruments
from app.instruments.watcher import CatalogWatcher
from tests.instruments.admin_support import add_instrument, disable_instrument
from tests.support import SEED_SYMBOLS

POLL = 0.05


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url)
    yield engine
    await engine.dispose()


@pytest.fixture
def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return create_session_factory(engine)


async def until(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def rename_table(engine: AsyncEngine, old: str, new: str) -> None:
    """What the watcher's query then meets is a real database error (no such table)."""
    async with engine.begin() as conn:
        await conn.execute(text(f"ALTER TABLE {old} RENAME TO {new}"))


class Recorder:
    def __init__(self) -> None:
        self.changes: list[CatalogChange] = []
        self.fail_next = False

    async def __call__(self, change: CatalogChange) -> None:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("a bug downstream")
        self.changes.append(change)

    def symbols(self) -> list[tuple[list[str], list[str]]]:
        return [([i.symbol for i in c.added], [i.symbol for i in c.removed]) for c in self.changes]


async def test_added_and_disabled_instruments_reach_the_catalog_and_on_change(
    database_url: str, sessions: async_sessionmaker[AsyncSession]
) -> None:
    catalog = Catalog(await load_instruments(sessions))
    seen = Recorder()
    watcher = CatalogWatcher(sessions, catalog, poll_seconds=POLL, on_change=seen)
    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.to_thread(add_instrument, database_url, "XRP-USD", "--reference-price", "2")
        await until(lambda: "XRP-USD" in catalog)
        info = catalog.get("XRP-USD")
        assert info is not None and info.price_decimals == 4
        assert info.reference_price == Decimal(2)
        await asyncio.to_thread(disable_instrument, database_url, "AAPL")
        await until(lambda: "AAPL" not in catalog)
        await until(lambda: len(seen.changes) == 2)
        assert seen.symbols() == [(["XRP-USD"], []), ([], ["AAPL"])]
        assert sorted(catalog.symbols) == sorted([*SEED_SYMBOLS, "XRP-USD"][1:])
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_failing_database_keeps_the_catalog_and_is_logged_once(
    database_url: str,
    engine: AsyncEngine,
    sessions: async_sessionmaker[AsyncSession],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="app.instruments.watcher")
    catalog = Catalog(await load_instruments(sessions))
    seen = Recorder()
    watcher = CatalogWatcher(sessions, catalog, poll_seconds=POLL, on_change=seen)
    task = asyncio.create_task(watcher.run())
    try:
        await rename_table(engine, "instruments", "instruments_away")
        await until(lambda: "cannot read them" in caplog.text)
        await asyncio.sleep(POLL * 10)  # many more polls fail
        assert caplog.text.count("cannot read them") == 1
        assert sorted(catalog.symbols) == sorted(SEED_SYMBOLS)  # kept, not emptied
        assert not task.done()

        await rename_table(engine, "instruments_away", "instruments")
        await asyncio.to_thread(add_instrument, database_url, "XRP-USD")
        await until(lambda: "XRP-USD" in catalog)
        assert "the database answers again" in caplog.text
        assert seen.symbols() == [(["XRP-USD"], [])]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_change_on_change_failed_on_is_handed_on_again(
    database_url: str, sessions: async_sessionmaker[AsyncSession]
) -> None:
    """`on_change` raises (to the supervisor, which restarts `run`): the catalog already holds
    the change, and the restarted watcher still hands it on."""
    catalog = Catalog(await load_instruments(sessions))
    seen = Recorder()
    seen.fail_next = True
    watcher = CatalogWatcher(sessions, catalog, poll_seconds=POLL, on_change=seen)
    await asyncio.to_thread(disable_instrument, database_url, "MSFT")
    with pytest.raises(RuntimeError, match="a bug downstream"):
        await asyncio.wait_for(watcher.run(), 5)
    assert "MSFT" not in catalog and seen.changes == []
    task = asyncio.create_task(watcher.run())  # what the supervisor does
    try:
        await until(lambda: bool(seen.changes))
        assert seen.symbols() == [([], ["MSFT"])]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
