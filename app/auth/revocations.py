"""Revoked tokens: the `revoked_tokens` table, and each instance's copy of what is in it.

`python -m app.admin revoke --jti …` names one token; `--sub …` every token of a subject
issued up to that moment (one with no `iat` included). Every instance reads the table each
REVOCATION_POLL_SECONDS and keeps in memory the rows not yet past their `keep_until`: those
tokens are refused (401, 4401), and the streams they opened are closed with 4401 at the poll
that first sees them, on every instance.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from sqlalchemy import Float, Integer, String, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Mapped, mapped_column

from app.db import DATABASE_ERRORS, Base
from app.logs import OncePer
from app.security import Principal

logger = logging.getLogger(__name__)

# The longest a revocation is kept by default: JWT_TTL_SECONDS is at most a day, so by then
# every token of ours it could name has expired.
DEFAULT_KEEP_SECONDS = 86_400


class RevokedToken(Base):
    __tablename__ = "revoked_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    jti: Mapped[str | None] = mapped_column(String(255))  # one token, or
    subject: Mapped[str | None] = mapped_column(String(255))  # all of one subject's so far
    revoked_at: Mapped[float] = mapped_column(Float)  # Unix seconds
    # By then every token it names has expired.
    keep_until: Mapped[float] = mapped_column(Float, index=True)


async def revoke(
    session: AsyncSession,
    *,
    jti: str | None = None,
    subject: str | None = None,
    keep_seconds: float = DEFAULT_KEEP_SECONDS,
) -> None:
    if not jti and not subject:
        raise ValueError("revoke a jti or a subject")
    now = time.time()
    row = RevokedToken(jti=jti, subject=subject, revoked_at=now, keep_until=now + keep_seconds)
    session.add(row)
    await session.commit()


Revoked = Callable[[Principal], bool]


class Revocations:
    """This instance's copy of the revocation list; `run` keeps it fresh."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        poll_seconds: float,
        on_revoked: Callable[[Revoked], Awaitable[object]],
    ) -> None:
        """`on_revoked(is_revoked)` runs when a poll finds new revocations (closing streams)."""
        self._sessions = sessions
        self._poll_seconds = poll_seconds
        self._on_revoked = on_revoked
        self._token_ids: set[str] = set()
        self._subjects: dict[str, float] = {}  # subject -> tokens issued up to then are revoked
        self._outages = OncePer(logger, seconds=60)

    def is_revoked(self, principal: Principal) -> bool:
        if principal.token_id is not None and principal.token_id in self._token_ids:
            return True
        until = self._subjects.get(principal.subject)
        if until is None:
            return False
        return principal.issued_at is None or principal.issued_at <= until

    async def refresh(self) -> bool:
        """Read the list; True if it revokes something it did not before."""
        query = select(RevokedToken.jti, RevokedToken.subject, RevokedToken.revoked_at).where(
            RevokedToken.keep_until > time.time()
        )
        async with self._sessions() as session:
            rows = (await session.execute(query)).all()
        token_ids: set[str] = set()
        subjects: dict[str, float] = {}
        for jti, subject, revoked_at in rows:
            if jti:
                token_ids.add(jti)
            elif subject:
                subjects[subject] = max(revoked_at, subjects.get(subject, revoked_at))
        new = bool(token_ids - self._token_ids) or any(
            at > self._subjects.get(subject, float("-inf")) for subject, at in subjects.items()
        )
        self._token_ids, self._subjects = token_ids, subjects
        return new

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._poll_seconds)
            try:
                changed = await self.refresh()
            except DATABASE_ERRORS as exc:  # keep the last list; the next poll tries again
                self._outages.warning("revocations: cannot read the list: %s", exc)
                continue
            if changed:
                await self._on_revoked(self.is_revoked)
