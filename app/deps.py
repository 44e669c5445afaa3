"""What routes depend on, as `Annotated` aliases read from the connection, so REST and
WebSocket routes share them. `AppState` is what the lifespan builds (app/main.py)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.requests import HTTPConnection

from app.auth.revocations import Revocations
from app.auth.throttle import TokenThrottle
from app.broker import Broker
from app.config import Settings
from app.errors import Forbidden, Unauthenticated
from app.feed.inbox import Inbox
from app.feed.producer import Producer
from app.feed.stats import FeedCounts
from app.history.service import History
from app.history.status import HistoryReport
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
    history: History  # the window and the database behind it (app/history/service.py)
    broker: Broker
    hub: FanoutHub
    streams: StreamRegistry
    supervisor: Supervisor
    producer: Producer | None  # None when PRODUCER=off (or it runs in its own process)
    inbox: Inbox | None  # where pushed quotes go; None: memory:// with PRODUCER=off
    instance: str
    redis: Redis | None
    rest_limit: RateLimiter  # REST requests per token subject (or client address)
    token_throttle: TokenThrottle  # the token endpoint's limits
    feed_counts: FeedCounts  # the producer's counts, wherever it runs (app/feed/stats.py)
    # The history writer's state, wherever the leader runs it; None: HISTORY_DAYS=0
    history_report: HistoryReport | None
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


async def _verify_rest_token(
    conn: HTTPConnection, state: AppState, bearer: HTTPAuthorizationCredentials | None
) -> Principal:
    """`Authorization: Bearer <jwt>` (read as `_bearer` reads it); no token or a bad one
    takes a request from the client address's bucket before its 401."""
    try:
        return verify_token(state, bearer.credentials if bearer else None)
    except Unauthenticated:
        await state.rest_limit.check(f"addr:{client_address(conn)}")
        raise


async def authenticate_rest(
    conn: HTTPConnection,
    state: Annotated[AppState, Depends(read_app_state)],
    bearer: BearerCredentials,
) -> Principal:
    """REST: a valid token, then one request from its subject's bucket."""
    principal = await _verify_rest_token(conn, state, bearer)
    await state.rest_limit.check(f"sub:{principal.subject}")
    return principal


def require_scope(scope: str) -> Callable[..., Awaitable[Principal]]:
    """A dependency: a valid token whose `scope` claim holds `scope` (401 without a valid
    token, 403 without the scope). A token that has it takes nothing from the REST rate
    limit: the route bounds its own traffic (POST /v1/ingest: the inbox's cap, 503 with
    Retry-After). One without it does, like any other REST request."""
    # The scope in the route's security requirement: /docs shows it beside the lock.
    credentials = Security(bearer_scheme, scopes=[scope])

    async def with_scope(
        conn: HTTPConnection,
        state: Annotated[AppState, Depends(read_app_state)],
        bearer: HTTPAuthorizationCredentials | None = credentials,
    ) -> Principal:
        principal = await _verify_rest_token(conn, state, bearer)
        if scope not in principal.scopes:
            await state.rest_limit.check(f"sub:{principal.subject}")
            raise Forbidden(f"this needs a token with the {scope!r} scope")
        return principal

    with_scope.__name__ = f"require_scope_{scope}"
    return with_scope


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
