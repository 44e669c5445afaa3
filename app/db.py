"""Database plumbing: the async engine, the session factory and the declarative Base."""

from __future__ import annotations

from sqlalchemy import MetaData, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase

# Stable constraint names, so Alembic migrations read the same on SQLite and PostgreSQL.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


# What a database that cannot answer raises: SQLAlchemy's errors, and the OSError asyncpg
# raises when it cannot connect (refused, timed out), which SQLAlchemy passes on unwrapped.
DATABASE_ERRORS = (SQLAlchemyError, OSError)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def create_engine(database_url: str, *, timeout: float = 5.0) -> AsyncEngine:
    """PostgreSQL gets `timeout` seconds per connection attempt and per query: a database
    that neither answers nor refuses (a partition) is an error soon, not after asyncpg's
    default of a minute per attempt, and queries none. SQLite is a local file."""
    connect_args = {"timeout": timeout, "command_timeout": timeout}
    if not database_url.startswith("postgresql+asyncpg"):
        connect_args = {}
    return create_async_engine(database_url, pool_pre_ping=True, connect_args=connect_args)


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


async def ping_database(engine: AsyncEngine) -> None:
    """Raise if the database cannot answer a trivial query."""
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
