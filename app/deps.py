"""What routes depend on, as `Annotated` aliases read from the connection, so REST and
WebSocket routes share them. `AppState` is what the lifespan builds (app/main.py)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.requests import HTTPConnection

from app.auth.revocations import Revocations
from app.auth.throttle import TokenThrottle
from app.broker import Broker
from app.config import Settings
from app.errors import Unauthenticated
from app.feed.producer import Producer
from app.feed.stats import FeedCounts
from app.instruments.catalog import Catalog
from app.logs import OncePer
from app.prices.hub import FanoutHub
from app.prices.store import TickStore
from app.prices.streams import StreamRegistry
from app.ratelimit import RateLimiter
from app.security import ExpiredToken, InvalidToken, Principal, TokenSigner, TokenVerifier
from app.supervisor import Supervisor


@dataclass(slots=True)
class AppState:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    signer: TokenSigner  # issues ours
    verifier: TokenVerifier  # verifies ours and an external issuer's
    revocations: Revocations
    catalog: Catalog
    store: TickStore
    broker: Broker
    hub: FanoutHub
    streams: StreamRegistry
    supervisor: Supervisor
    producer: Producer | None  # None when PRODUCER=off (or it runs in its own process)
    instance: str
    redis: Redis | None
    rest_limit: RateLimiter  # REST requests per token subject (or client address)
    token_throttle: TokenThrottle  # the token endpoint's limits
    feed_counts: FeedCounts  # the producer's counts, wherever it runs (app/feed/stats.py)
    # A database outage fails every request that needs it: one log line a minute says so.
    database_outages: OncePer = field(
        default_factory=lambda: OncePer(logging.getLogger("app.db"), seconds=60)
    )


def read_app_state(conn: HTTPConnection) -> AppState:
    state: AppState = conn.state.app
    return state


async def open_db_session(
    state: Annotated[AppState, Depends(read_app_state)],
) -> AsyncIterator[AsyncSession]:
    async with state.sessions() as session:
        yield session


# The schema's `bearer` security scheme: the lock on each route that takes a token, and the
# Authorize button of /docs. auto_error=False: a missing token is `verify_token`'s 401, in the
# shape of every error, not FastAPI's 403.
bearer_scheme = HTTPBearer(
    scheme_name="bearer",
    bearerFormat="JWT",
    description="An access token from `POST /v1/auth/token`",
    auto_error=False,
)
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]


def _bearer(conn: HTTPConnection) -> str | None:
    scheme, _, credentials = conn.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return None


def verify_token(state: AppState, token: str | None) -> Principal:
    if not token:
        raise Unauthenticated("a bearer token is required")
    try:
        principal = state.verifier.verify(token)
    except ExpiredToken as exc:
        raise Unauthenticated("the token has expired") from exc
    except InvalidToken as exc:
        raise Unauthenticated("the token is not valid") from exc
    if state.revocations.is_revoked(principal):
        raise Unauthenticated("the token has been revoked")
    return principal


def client_address(conn: HTTPConnection) -> str:
    """The peer's address (behind a trusted proxy, uvicorn's `proxy_headers` put the
    forwarded one there)."""
    return conn.client.host if conn.client is not None else "unknown"


async def authenticate_rest(
    conn: HTTPConnection,
    state: Annotated[AppState, Depends(read_app_state)],
    bearer: BearerCredentials,
) -> Principal:
    """REST: `Authorization: Bearer <jwt>` (read as `_bearer` reads it), then one request from
    its subject's bucket; no token or a bad one takes from the client address's bucket."""
    try:
        principal = verify_token(state, bearer.credentials if bearer else None)
    except Unauthenticated:
        await state.rest_limit.check(f"addr:{client_address(conn)}")
        raise
    await state.rest_limit.check(f"sub:{principal.subject}")
    return principal


def read_stream_token(conn: HTTPConnection) -> str | None:
    """WebSocket and SSE: the header, or `?token=` for browsers, which cannot set headers."""
    return _bearer(conn) or conn.query_params.get("token")


def authenticate_stream(
    conn: HTTPConnection,
    state: Annotated[AppState, Depends(read_app_state)],
    _: BearerCredentials,  # only for the schema's lock: the token is read as WebSockets read it
) -> Principal:
    """SSE: `read_stream_token`, as on the WebSocket routes."""
    return verify_token(state, read_stream_token(conn))


StateDep = Annotated[AppState, Depends(read_app_state)]
SessionDep = Annotated[AsyncSession, Depends(open_db_session)]
CurrentPrincipal = Annotated[Principal, Depends(authenticate_rest)]
