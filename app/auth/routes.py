"""The token endpoint (OAuth 2 client credentials)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Form, Request
from pydantic import BaseModel

from app.auth.service import authenticate_client
from app.deps import SessionDep, StateDep, client_address
from app.errors import ErrorOutDoc, Unauthenticated

router = APIRouter(prefix="/v1/auth", tags=["auth"])


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
        503: {**ErrorOutDoc, "description": "Too many token requests at once"},
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
    client = await authenticate_client(
        session, client_id=client_id, client_secret=client_secret, checks=throttle.checks
    )
    if client is None:
        raise Unauthenticated("unknown client or wrong secret")
    ttl = state.settings.jwt_ttl_seconds
    token = state.signer.issue(
        subject=client.client_id, symbols=list(client.symbols), ttl_seconds=ttl
    )
    return TokenOut(access_token=token, expires_in=ttl)
