"""Reading instruments from the database."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.instruments.models import Instrument


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
    return [
        InstrumentInfo(
            symbol=row.symbol,
            name=row.name,
            asset_class=row.asset_class,
            price_decimals=row.price_decimals,
            reference_price=Decimal(row.reference_price),
        )
        for row in rows
    ]


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
