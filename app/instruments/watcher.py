"""Instruments added or disabled while the service runs: every process polls the active ones
and applies what changed to its catalog.

`python -m app.admin add-instrument` and `disable-instrument` write the `instruments` table;
each server and each standalone producer (`python -m app.feed`) reads the active rows every
INSTRUMENT_POLL_SECONDS (2 by default, so a change shows within 5 s) and makes them its
catalog (`Catalog.replace`): from then on REST resolves and lists what the database says, and
the producer quotes it on its next round. What changed goes to `on_change` (the server's hub
and streams follow it: app/main.py). A database that does not answer leaves the catalog as it
was: one line when it goes, one when it is back, and the next poll tries again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db import DATABASE_ERRORS
from app.instruments.catalog import Catalog, CatalogChange
from app.instruments.repository import list_active_instruments

logger = logging.getLogger(__name__)


async def _ignore(change: CatalogChange) -> None:
    """`on_change` of a process with nothing to follow but the catalog (the producer)."""


class CatalogWatcher:
    """Keeps `catalog` to the database's active instruments; `run` polls until cancelled."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        catalog: Catalog,
        *,
        poll_seconds: float,
        on_change: Callable[[CatalogChange], Awaitable[None]] = _ignore,
    ) -> None:
        self._sessions = sessions
        self._catalog = catalog
        self._poll_seconds = poll_seconds
        self._on_change = on_change
        # The instruments `on_change` has been told of (at first: what the process started
        # with). A change it failed on is owed, and handed on again after the next poll.
        self._handed = {i.symbol: i for i in catalog}
        self._unreachable = False  # the last poll failed: said once, until one works

    async def refresh(self) -> CatalogChange:
        """Read the active instruments and make them the catalog; what changed."""
        async with self._sessions() as session:
            instruments = await list_active_instruments(session)
        change = self._catalog.replace(instruments)
        if change.added or change.removed:
            logger.info(
                "instruments: %s; %d active",
                _describe(change),
                len(self._catalog),
            )
            if not instruments:
                logger.warning("instruments: none is active; nothing is produced or served")
        return change

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._poll_seconds)
            try:
                await self.refresh()
            except DATABASE_ERRORS as exc:  # keep the current set; the next poll tries again
                if not self._unreachable:
                    logger.warning(
                        "instruments: cannot read them (%s); keeping the %d known, retrying "
                        "every %gs",
                        str(exc).splitlines()[0][:200],  # not the whole SQL statement
                        len(self._catalog),
                        self._poll_seconds,
                    )
                    self._unreachable = True
                continue
            if self._unreachable:
                logger.warning("instruments: the database answers again")
                self._unreachable = False
            owed = self._owed()
            if owed.added or owed.removed:
                await self._on_change(owed)  # raises to the supervisor; owed until it works
                self._handed = {i.symbol: i for i in self._catalog}

    def _owed(self) -> CatalogChange:
        """How the catalog differs from what `on_change` was told."""
        current = {i.symbol: i for i in self._catalog}
        return CatalogChange(
            added=[i for s, i in current.items() if self._handed.get(s) != i],
            removed=[i for s, i in self._handed.items() if s not in current],
        )


def _describe(change: CatalogChange) -> str:
    parts = []
    if change.added:
        parts.append("added or changed " + ", ".join(i.symbol for i in change.added))
    if change.removed:
        parts.append("disabled " + ", ".join(i.symbol for i in change.removed))
    return "; ".join(parts)
