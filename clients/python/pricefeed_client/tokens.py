"""Access tokens: fetched with client credentials (or from a provider of your own), kept,
and renewed at 80% of their lifetime, before the service would close a stream with 4408."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

RENEW_AT = 0.8  # of a token's lifetime
MIN_LIFETIME_SECONDS = 1.0  # a token said to expire sooner is still kept this long


@dataclass(frozen=True, slots=True)
class AccessToken:
    """A bearer token and when it expires (epoch seconds)."""

    value: str = field(repr=False)  # a token never goes into a log line
    expires_at: float


TokenProvider = Callable[[], Awaitable[AccessToken]]


class TokenKeeper:
    """The current token; `renew_in()` says how long it may be used before a new one is due."""

    def __init__(self, provider: TokenProvider) -> None:
        self._provider = provider
        self._token: AccessToken | None = None
        self._renew_at = 0.0  # time.monotonic()

    async def current(self) -> str:
        """The token in force, renewed first if it is due."""
        if self._token is None or self.renew_in() <= 0:
            return await self.renew()
        return self._token.value

    async def renew(self) -> str:
        token = await self._provider()
        lifetime = max(token.expires_at - time.time(), MIN_LIFETIME_SECONDS)
        self._token, self._renew_at = token, time.monotonic() + RENEW_AT * lifetime
        return token.value

    def renew_in(self) -> float:
        """Seconds until the token should be replaced (<= 0: now)."""
        return self._renew_at - time.monotonic()

    def postpone(self, seconds: float) -> None:
        """Try renewing again in `seconds` (after a renewal that failed)."""
        self._renew_at = time.monotonic() + seconds

    def forget(self) -> None:
        """The service refused the token (4401, 4408): the next `current()` fetches anew."""
        self._token = None
