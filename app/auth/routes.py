"""The token endpoint (OAuth 2 client credentials)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Form, Request
from pydantic import BaseModel

from app.auth.service import authenticate_client
from app.db import DATABASE_ERRORS
from app.deps import SessionDep, StateDep, client_address
from app.errors import ErrorOutDoc, Unauthenticated, Unavailable

router = APIRouter(prefix="/v1/auth", tags=["auth"])

# A database outage: each request gets a 503 it can retry (the log: one line a minute).
DATABASE_RETRY_AFTER_SECONDS = 5


class TokenOut(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int


@router.post(
    "/token",
    response_model=TokenOut,
    responses={
        401: ErrorOutDoc,
        429: {**ErrorOutDoc, "description": "Too many requests from this address or client_id"},
        503: {
            **ErrorOutDoc,
            "description": "Database unreachable, or too many token requests at once: retry "
            "after `Retry-After`",
        },
    },
)
async def issue_token(
    request: Request,
    session: SessionDep,
    state: StateDep,
    grant_type: Annotated[Literal["client_credentials"], Form()],
    client_id: Annotated[str, Form(min_length=1, max_length=64)],
    client_secret: Annotated[str, Form(min_length=1, max_length=256)],
) -> TokenOut:
    """Trade client credentials for a short-lived access token (a JWT). Limited per client
    address and per `client_id` (429), and in secret checks at once (503), with Retry-After."""
    throttle = state.token_throttle
    await throttle.admit(address=client_address(request), client_id=client_id)
    try:
        client = await authenticate_client(
            session, client_id=client_id, client_secret=client_secret, checks=throttle.checks
        )
    except DATABASE_ERRORS as exc:
        # One line: SQLAlchemy's messages run to several; a timeout's is empty.
        first_line = next(iter(str(exc).splitlines()), "") or "no answer"
        state.database_outages.warning(
            "token endpoint: database unavailable, answering 503 (%s: %s)",
            type(exc).__name__,
            first_line,
        )
        raise Unavailable(
            "database unavailable; retry shortly", retry_after=DATABASE_RETRY_AFTER_SECONDS
        ) from None
    if client is None:
        raise Unauthenticated("unknown client or wrong secret")
    ttl = state.settings.jwt_ttl_seconds
    token = state.signer.issue(
        subject=client.client_id,
        symbols=list(client.symbols),
        scopes=list(client.scopes or ()),  # a row written before 0004 may hold none
        ttl_seconds=ttl,
    )
    return TokenOut(access_token=token, expires_in=ttl)
