"""The error tree. Each error carries what REST answers (status) and what a stream closes
with (close code); one handler turns them into responses.

    PricefeedError            500 / 1011
    ├── Unauthenticated       401 / 4401   no token, bad token
    ├── Forbidden             403 / 4403   symbol not entitled
    ├── UnknownSymbol         404 / 4404
    ├── InvalidRequest        422 / 1008
    ├── RateLimited           429 / 1008   too many streams for one token subject
    └── Unavailable           503 / 1013   a dependency (store, broker) is down
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError


class PricefeedError(Exception):
    status_code = 500
    close_code = 1011
    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def headers(self) -> dict[str, str] | None:
        return None


class Unauthenticated(PricefeedError):
    status_code, close_code, code = 401, 4401, "unauthenticated"

    @property
    def headers(self) -> dict[str, str] | None:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(PricefeedError):
    status_code, close_code, code = 403, 4403, "forbidden"


class UnknownSymbol(PricefeedError):
    status_code, close_code, code = 404, 4404, "unknown_symbol"


class InvalidRequest(PricefeedError):
    status_code, close_code, code = 422, 1008, "invalid_request"


class RateLimited(PricefeedError):
    status_code, close_code, code = 429, 1008, "rate_limited"


class Unavailable(PricefeedError):
    status_code, close_code, code = 503, 1013, "unavailable"


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
