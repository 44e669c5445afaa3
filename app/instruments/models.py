"""Instruments: the symbols the service knows, with their display name and price precision."""

from __future__ import annotations

from decimal import Decimal

from sqlalchemy import Boolean, Integer, Numeric, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base


class Instrument(Base):
    __tablename__ = "instruments"

    symbol: Mapped[str] = mapped_column(String(16), primary_key=True)
    name: Mapped[str] = mapped_column(String(120))
    asset_class: Mapped[str] = mapped_column(String(16))  # equity | crypto | fx
    price_decimals: Mapped[int] = mapped_column(Integer)
    reference_price: Mapped[Decimal] = mapped_column(Numeric(24, 8))  # where the simulator starts
    active: Mapped[bool] = mapped_column(Boolean, default=True)
