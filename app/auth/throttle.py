"""What guards the token endpoint, whose every request costs a scrypt check (~40 ms of CPU and
16 MiB): a rate limit per client address and per `client_id` (429 with Retry-After), and a cap
on the secret checks this process runs at once (503 with Retry-After past a short wait).

A flood of token requests therefore makes a renewal fail fast and retry, never queue behind the
flood for seconds. A request for an unknown `client_id` runs no scrypt at all: it waits as long
as a real check lately took, so anonymous senders inventing ids cost neither CPU nor check
slots, and on a server not flooded with checks the timing tells nothing of which ids exist.
(In a flood, a known id may wait for a slot where an unknown one does not: probing that way is
as slow as the per-address limit makes it.)
"""

from __future__ import annotations

import asyncio
import time
from functools import cache

from app import metrics
from app.errors import Unavailable
from app.ratelimit import Buckets, RateLimiter, retry_after
from app.security import DUMMY_SECRET_HASH, verify_secret

_AVERAGED = 0.2  # weight of the newest check in the running average of their durations


def _timed_verify(secret: str, secret_hash: str) -> tuple[bool, float]:
    started = time.perf_counter()
    ok = verify_secret(secret, secret_hash)
    return ok, time.perf_counter() - started


@cache
def _measured_check_seconds() -> float:
    """One check's duration on this machine, measured once per process."""
    return _timed_verify("not-a-secret", DUMMY_SECRET_HASH)[1]


class SecretChecks:
    """Client-secret checks, in threads, at most `limit` at once; one that cannot start within
    `wait` seconds is refused with 503 and Retry-After."""

    def __init__(self, *, limit: int, wait: float) -> None:
        self._slots = asyncio.Semaphore(limit)
        self._wait = wait
        self._typical = _measured_check_seconds()

    async def verify(self, secret: str, secret_hash: str) -> bool:
        if self._slots.locked():
            try:
                async with asyncio.timeout(self._wait):
                    await self._slots.acquire()
            except TimeoutError:
                metrics.REFUSED.labels(limit="token-checks").inc()
                raise Unavailable(
                    "too many token requests at once; retry shortly",
                    retry_after=retry_after(self._wait),
                ) from None
        else:
            await self._slots.acquire()
        try:
            ok, took = await asyncio.to_thread(_timed_verify, secret, secret_hash)
        finally:
            self._slots.release()
        self._typical += _AVERAGED * (took - self._typical)
        return ok

    async def pretend(self) -> None:
        """Take as long as a check (for an unknown client), without its CPU."""
        await asyncio.sleep(self._typical)


class TokenThrottle:
    """The token endpoint's limits: `admit` a request, then check its secret with `checks`."""

    def __init__(
        self,
        buckets: Buckets,
        *,
        per_minute: float,
        burst: int,
        max_checks: int,
        check_wait: float,
    ) -> None:
        rate = per_minute / 60
        self._per_address = RateLimiter(
            buckets, name="token-address", what="client address", rate=rate, burst=burst
        )
        self._per_client = RateLimiter(
            buckets, name="token-client", what="client_id", rate=rate, burst=burst
        )
        self.checks = SecretChecks(limit=max_checks, wait=check_wait)

    async def admit(self, *, address: str, client_id: str) -> None:
        """One request from the address's bucket, then from the client id's (429 past either)."""
        await self._per_address.check(address)
        await self._per_client.check(client_id)
