"""API clients: who may ask for a token (hashed secret), which symbols they may read, and
what else they may do (`scopes`, e.g. `publish`: push prices)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Boolean, DateTime, String, func
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base


class ApiClient(Base):
    __tablename__ = "api_clients"

    client_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(120))
    secret_hash: Mapped[str] = mapped_column(String(255))
    symbols: Mapped[list[str]] = mapped_column(JSON)  # entitled symbols, or ["*"]
    # Put in the token's `scope` claim (app/security.py KNOWN_SCOPES lists what there is).
    scopes: Mapped[list[str]] = mapped_column(JSON, default=list, server_default="[]")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
