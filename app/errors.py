"""The error tree. Each error carries what REST answers (status) and what a stream closes
with (close code); one handler turns them into responses.

    PricefeedError            500 / 1011
    ├── Unauthenticated       401 / 4401   no token, bad or revoked token
    ├── Forbidden             403 / 4403   symbol not entitled
    ├── UnknownSymbol         404 / 4404
    ├── PayloadTooLarge       413 / 1009   a request body past its route's limit
    ├── InvalidRequest        422 / 1008
    ├── RateLimited           429 / 1008   too many streams or requests (REST, token endpoint)
    └── Unavailable           503 / 1013   a dependency (store, broker, database) is down

`CloseCode` is the one list of WebSocket close codes: the server closes with its members, the
client reads them, and the protocol page in /docs renders its table from them.

Every error a client gets over HTTP has one shape, `{"detail": "<one line>", "code": "<word>"}`:
the errors above, a request that fails validation (422 `invalid_request`, with the list of
problems in `errors`), an unknown route or method (404 `not_found`, 405 `method_not_allowed`)
and an unexpected failure (500 `internal`). `document_error_shapes` puts the 422 one in the
OpenAPI schema in place of FastAPI's.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.utils import is_body_allowed_for_status_code
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException


class CloseCode(IntEnum):
    """Every code a pricefeed stream closes with but 1000 (the normal close that answers the
    client's own); `meaning` says when, for clients and docs."""

    GOING_AWAY = 1001
    INVALID_DATA = 1007
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
    CloseCode.INVALID_DATA: "a text frame that is not valid UTF-8",
    CloseCode.POLICY: (
        "too many messages per second, too many connections for one token subject, a bad `since`"
    ),
    CloseCode.TOO_BIG: "client frame too large (16 KiB by default)",
    CloseCode.INTERNAL: "unexpected server error: reconnect",
    CloseCode.TRY_LATER: (
        "overloaded, or this client read too slowly (a send stuck 10 s): reconnect later"
    ),
    CloseCode.BAD_TOKEN: (
        "no token, bad token (also a bad token in an `auth` request); a revoked token's streams"
    ),
    CloseCode.NOT_ENTITLED: "symbol not entitled",
    CloseCode.UNKNOWN_SYMBOL: "unknown symbol, or its instrument disabled (per-symbol route)",
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

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after  # whole seconds, for a 429 or 503 `Retry-After`

    @property
    def headers(self) -> dict[str, str] | None:
        return None if self.retry_after is None else {"Retry-After": str(self.retry_after)}


class Unauthenticated(PricefeedError):
    status_code, close_code, code = 401, CloseCode.BAD_TOKEN, "unauthenticated"

    @property
    def headers(self) -> dict[str, str] | None:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(PricefeedError):
    status_code, close_code, code = 403, CloseCode.NOT_ENTITLED, "forbidden"


class UnknownSymbol(PricefeedError):
    status_code, close_code, code = 404, CloseCode.UNKNOWN_SYMBOL, "unknown_symbol"


class PayloadTooLarge(PricefeedError):
    status_code, close_code, code = 413, CloseCode.TOO_BIG, "payload_too_large"


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


_WHERE = {
    "query": "query parameter",
    "path": "path parameter",
    "header": "header",
    "cookie": "cookie",
    "body": "body field",
}
_SUMMARISED = 3  # problems named in `detail`; `errors` lists them all


def _describe(error: dict[str, Any]) -> str:
    """`query parameter 'limit': Input should be greater than or equal to 1`."""
    where, *names = [str(part) for part in error.get("loc", ())] or ["request"]
    name = ".".join(names)
    place = f"{_WHERE.get(where, where)} {name!r}" if name else f"request {where}"
    return f"{place}: {error.get('msg', 'invalid')}"


def summarise_validation_errors(errors: Sequence[dict[str, Any]]) -> str:
    lines = [_describe(error) for error in errors[:_SUMMARISED]]
    if len(errors) > _SUMMARISED:
        lines.append(f"and {len(errors) - _SUMMARISED} more")
    return "; ".join(lines) or "invalid request"


async def _handle_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    # Not pydantic's `input` and `ctx`: they echo what was sent (a client secret, say).
    listed = [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type"))}
        for e in errors
    ]
    return JSONResponse(
        {
            "detail": summarise_validation_errors(errors),
            "code": InvalidRequest.code,
            "errors": listed,
        },
        status_code=InvalidRequest.status_code,
    )


def _http_code(status: int) -> str:
    """404 → `not_found`, 405 → `method_not_allowed`: the status phrase as a word."""
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "http_error"


async def _handle_http(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (no route, wrong method, a missing static file)."""
    assert isinstance(exc, HTTPException)
    if not is_body_allowed_for_status_code(exc.status_code):
        return Response(status_code=exc.status_code, headers=exc.headers)
    detail = str(exc.detail)
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"nothing at {request.url.path}"
    elif exc.status_code == 405 and detail == "Method Not Allowed":
        detail = f"{request.method} is not allowed on {request.url.path}"
    return JSONResponse(
        {"detail": detail, "code": _http_code(exc.status_code)},
        status_code=exc.status_code,
        headers=exc.headers,
    )


async def _handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Starlette re-raises the exception after this answer, so the server still logs it.
    return await _handle(request, PricefeedError("unexpected server error"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(PricefeedError, _handle)
    # The Redis tick store unreachable: a 503 the client can retry, never a 500.
    app.add_exception_handler(RedisError, _handle_store_down)
    app.add_exception_handler(RequestValidationError, _handle_validation)
    app.add_exception_handler(HTTPException, _handle_http)
    app.add_exception_handler(Exception, _handle_unexpected)


VALIDATION_ERROR_SCHEMA: dict[str, Any] = {
    "title": "ValidationErrorOut",
    "type": "object",
    "required": ["detail", "code"],
    "properties": {
        "detail": {
            "type": "string",
            "description": "One line naming each bad parameter and the problem",
            "examples": ["query parameter 'limit': Input should be greater than or equal to 1"],
        },
        "code": {"type": "string", "examples": ["invalid_request"]},
        "errors": {
            "type": "array",
            "description": "Each problem (absent when the service, not the schema, refused)",
            "items": {
                "type": "object",
                "required": ["loc", "msg", "type"],
                "properties": {
                    "loc": {
                        "type": "array",
                        "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                    },
                    "msg": {"type": "string"},
                    "type": {"type": "string"},
                },
            },
        },
    },
}
_FASTAPI_422_SCHEMAS = ("HTTPValidationError", "ValidationError")


def document_error_shapes(schema: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI schema with each 422 response in the shape `_handle_validation` answers,
    instead of FastAPI's `HTTPValidationError` (a list in `detail`). A route's own example
    of its 422 stays."""
    ref = {"$ref": "#/components/schemas/ValidationErrorOut"}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            response = operation.get("responses", {}).get("422")
            if response is not None:
                declared = response.get("content", {}).get("application/json", {})
                kept = {k: v for k, v in declared.items() if k in ("example", "examples")}
                response["content"] = {"application/json": {"schema": ref, **kept}}
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["ValidationErrorOut"] = VALIDATION_ERROR_SCHEMA
    for name in _FASTAPI_422_SCHEMAS:
        components.pop(name, None)
    return schema


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
