"""The error tree. Each error carries what REST answers (status) and what a stream closes
with (close code); one handler turns them into responses.

    PricefeedError            500 / 1011
    ├── Unauthenticated       401 / 4401   no token, bad token
    ├── Forbidden             403 / 4403   symbol not entitled
    ├── UnknownSymbol         404 / 4404
    ├── InvalidRequest        422 / 1008
    ├── RateLimited           429 / 1008   too many streams for one token subject
    └── Unavailable           503 / 1013   a dependency (store, broker) is down

`CloseCode` is the one list of WebSocket close codes: the server closes with its members, the
client reads them, and the protocol page in /docs renders its table from them.
"""

from __future__ import annotations

from enum import IntEnum

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError


class CloseCode(IntEnum):
    """Every code a pricefeed stream closes with; `meaning` says when, for clients and docs."""

    GOING_AWAY = 1001
    POLICY = 1008
    TOO_BIG = 1009
    INTERNAL = 1011
    TRY_LATER = 1013
    BAD_TOKEN = 4401
    NOT_ENTITLED = 4403
    UNKNOWN_SYMBOL = 4404
    TOKEN_EXPIRED = 4408

    @property
    def meaning(self) -> str:
        return _CLOSE_MEANINGS[self]


_CLOSE_MEANINGS = {
    CloseCode.GOING_AWAY: "server going away (deploy, shutdown): reconnect",
    CloseCode.POLICY: (
        "too many messages per second, too many connections for one token subject, a bad `since`"
    ),
    CloseCode.TOO_BIG: "client frame too large (16 KiB by default)",
    CloseCode.INTERNAL: "unexpected server error: reconnect",
    CloseCode.TRY_LATER: (
        "overloaded, or this client read too slowly (a send stuck 10 s): reconnect later"
    ),
    CloseCode.BAD_TOKEN: "no token, bad token (also a bad token in an `auth` request)",
    CloseCode.NOT_ENTITLED: "symbol not entitled",
    CloseCode.UNKNOWN_SYMBOL: "unknown symbol (per-symbol route)",
    CloseCode.TOKEN_EXPIRED: "token expired while connected",
}


def close_code_table() -> str:
    """The close codes as a Markdown table (the protocol page in /docs)."""
    rows = [f"| {code.value} | {code.meaning} |" for code in CloseCode]
    return "\n".join(["| code | when |", "| --- | --- |", *rows])


class PricefeedError(Exception):
    status_code = 500
    close_code = CloseCode.INTERNAL
    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def headers(self) -> dict[str, str] | None:
        return None


class Unauthenticated(PricefeedError):
    status_code, close_code, code = 401, CloseCode.BAD_TOKEN, "unauthenticated"

    @property
    def headers(self) -> dict[str, str] | None:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(PricefeedError):
    status_code, close_code, code = 403, CloseCode.NOT_ENTITLED, "forbidden"


class UnknownSymbol(PricefeedError):
    status_code, close_code, code = 404, CloseCode.UNKNOWN_SYMBOL, "unknown_symbol"


class InvalidRequest(PricefeedError):
    status_code, close_code, code = 422, CloseCode.POLICY, "invalid_request"


class RateLimited(PricefeedError):
    status_code, close_code, code = 429, CloseCode.POLICY, "rate_limited"


class Unavailable(PricefeedError):
    status_code, close_code, code = 503, CloseCode.TRY_LATER, "unavailable"


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, PricefeedError)
    return JSONResponse(
        {"detail": exc.message, "code": exc.code}, status_code=exc.status_code, headers=exc.headers
    )


async def _handle_store_down(request: Request, exc: Exception) -> JSONResponse:
    return await _handle(request, Unavailable("price store unavailable; retry shortly"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(PricefeedError, _handle)
    # The Redis tick store unreachable: a 503 the client can retry, never a 500.
    app.add_exception_handler(RedisError, _handle_store_down)


ErrorOutDoc = {
    "description": "An error",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"detail": {"type": "string"}, "code": {"type": "string"}},
            }
        }
    },
}
