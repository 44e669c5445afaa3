"""Instruments in the database: reading the active ones, and the operator's writes (adding,
updating, disabling: `python -m app.admin add-instrument`, `disable-instrument`), which every
instance picks up on its next poll (app/instruments/watcher.py)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.instruments.models import Instrument

ASSET_CLASSES = ("equity", "crypto", "fx")
MAX_DECIMALS = 8  # NUMERIC(24, 8): what a price column keeps
MAX_NAME_LENGTH = 120  # the column's

# Where the simulated source starts a new instrument added without a reference price. Only
# that source reads it (replay, coinbase and ingest quote what their source says), which is
# why the contract's `add-instrument` example may leave it out; 1 is a valid price at every
# precision (0 to 8 decimals), and the command's output line shows it.
DEFAULT_REFERENCE_PRICE = Decimal(1)


@dataclass(frozen=True, slots=True)
class InstrumentInfo:
    """A detached, immutable view of an instrument, safe to share across tasks."""

    symbol: str
    name: str
    asset_class: str
    price_decimals: int
    reference_price: Decimal


async def list_active_instruments(session: AsyncSession) -> list[InstrumentInfo]:
    rows = await session.scalars(
        select(Instrument).where(Instrument.active.is_(True)).order_by(Instrument.symbol)
    )
    return [_info(row) for row in rows]


def _info(row: Instrument) -> InstrumentInfo:
    return InstrumentInfo(
        symbol=row.symbol,
        name=row.name,
        asset_class=row.asset_class,
        price_decimals=row.price_decimals,
        reference_price=Decimal(row.reference_price),
    )


@dataclass(frozen=True, slots=True)
class InstrumentWrite:
    """What an operator's write did: the instrument before (None: it is new) and after."""

    before: InstrumentInfo | None
    was_active: bool
    after: InstrumentInfo

    def describe(self) -> str:
        """One line for the operator."""
        after, before = self.after, self.before
        price = f"{after.reference_price:.{after.price_decimals}f}"
        if before is None:
            return (
                f"added {after.symbol} ({after.name}, {after.asset_class}, "
                f"{after.price_decimals} decimals, reference price {price})"
            )
        changes = [
            f"{label} {old} -> {new}"
            for label, old, new, differ in (
                ("name", repr(before.name), repr(after.name), before.name != after.name),
                (
                    "asset class",
                    before.asset_class,
                    after.asset_class,
                    before.asset_class != after.asset_class,
                ),
                (
                    "decimals",
                    before.price_decimals,
                    after.price_decimals,
                    before.price_decimals != after.price_decimals,
                ),
                (
                    "reference price",
                    f"{before.reference_price:.{before.price_decimals}f}",
                    price,
                    before.reference_price != after.reference_price,
                ),
            )
            if differ
        ]
        if not self.was_active:
            changes.insert(0, "re-activated")
        return f"updated {after.symbol}: {', '.join(changes) or 'unchanged'}"


class UnknownInstrument(LookupError):
    """No instrument has that symbol."""


async def upsert_instrument(
    session: AsyncSession,
    *,
    symbol: str,
    name: str,
    asset_class: str,
    price_decimals: int,
    reference_price: Decimal | None,
) -> InstrumentWrite:
    """Create `symbol`, or update it and make it active again. Without a `reference_price`
    an existing instrument keeps its own and a new one gets DEFAULT_REFERENCE_PRICE. The
    caller checks the values (app/admin.py)."""
    row = await session.get(Instrument, symbol)
    before, was_active = (None, False) if row is None else (_info(row), row.active)
    if row is None:
        row = Instrument(symbol=symbol, reference_price=DEFAULT_REFERENCE_PRICE)
        session.add(row)
    row.name = name
    row.asset_class = asset_class
    row.price_decimals = price_decimals
    if reference_price is not None:
        row.reference_price = reference_price
    row.active = True
    await session.commit()
    return InstrumentWrite(before=before, was_active=was_active, after=_info(row))


async def disable_instrument(session: AsyncSession, symbol: str) -> bool:
    """Make `symbol` inactive; False if it was inactive already. UnknownInstrument if no
    instrument has that symbol. The row stays: its ticks and candles keep their name."""
    row = await session.get(Instrument, symbol)
    if row is None:
        raise UnknownInstrument(symbol)
    if not row.active:
        return False
    row.active = False
    await session.commit()
    return True


async def load_instruments(sessions: async_sessionmaker[AsyncSession]) -> list[InstrumentInfo]:
    """The active instruments; a clear error when the database is not there or not migrated."""
    try:
        async with sessions() as session:
            instruments = await list_active_instruments(session)
    except SQLAlchemyError as exc:
        raise RuntimeError(
            f"database not ready ({type(exc).__name__}); is DATABASE_URL right, "
            "and has `alembic upgrade head` run?"
        ) from exc
    if not instruments:
        raise RuntimeError("no active instruments in the database; run `alembic upgrade head`")
    return instruments
