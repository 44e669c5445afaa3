"""API clients: checking credentials, seeding the dev demo client, and disabling it in prod."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import CursorResult, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.auth.models import ApiClient
from app.auth.throttle import SecretChecks
from app.security import hash_secret, verify_secret


async def authenticate_client(
    session: AsyncSession, *, client_id: str, client_secret: str, checks: SecretChecks
) -> ApiClient | None:
    """The active client with these credentials, or None. Takes the same time either way:
    an unknown id waits as long as a check takes (`checks` runs scrypt off the event loop)."""
    client = await session.get(ApiClient, client_id)
    # The check is slow: hand the connection back first, or a flood of token requests holds
    # the whole pool. The row stays readable (closing detaches it, it does not expire it).
    await session.close()
    if client is None:
        await checks.pretend()
        return None
    ok = await checks.verify(client_secret, client.secret_hash)
    if not ok or not client.active:
        return None
    return client


async def upsert_client(
    session: AsyncSession,
    *,
    client_id: str,
    name: str,
    secret: str,
    symbols: list[str],
    scopes: Sequence[str] = (),
) -> ApiClient:
    """Create the client, or update it (symbols and scopes become exactly these); safe when
    several instances seed it at once."""
    for attempt in (1, 2):
        client = await session.get(ApiClient, client_id)
        if client is None:
            secret_hash = await asyncio.to_thread(hash_secret, secret)
            client = ApiClient(client_id=client_id, secret_hash=secret_hash)
            session.add(client)
        elif not await asyncio.to_thread(verify_secret, secret, client.secret_hash):
            client.secret_hash = await asyncio.to_thread(hash_secret, secret)
        client.name, client.symbols, client.active = name, symbols, True
        client.scopes = sorted(set(scopes))
        try:
            await session.commit()
        except IntegrityError:
            await session.rollback()  # another instance inserted it first: update that row
            if attempt == 2:
                raise
            continue
        return client
    raise AssertionError("unreachable")


async def disable_client(session: AsyncSession, client_id: str) -> bool:
    """Disable the client if it is active; True if this call disabled it. One UPDATE, so that
    of several instances starting at once only one sees it change."""
    disable = (
        update(ApiClient)
        .where(ApiClient.client_id == client_id, ApiClient.active.is_(True))
        .values(active=False)
    )
    result = cast(CursorResult[Any], await session.execute(disable))  # an UPDATE's result
    await session.commit()
    return result.rowcount > 0
