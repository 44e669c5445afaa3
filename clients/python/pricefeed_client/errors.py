"""What can go wrong, and the close codes a pricefeed stream ends with.

    PricefeedError
    ├── ApiError            a REST answer other than 2xx (`status`, `code`, `detail`)
    ├── ProtocolError       an answer that is not what the protocol says (a bug, or not pricefeed)
    └── StreamRefused       a stream the service will not serve again as asked (`code`, `reason`):
        ├── Unauthorized        4401  the token was refused, and a fresh one too
        ├── NotEntitled         4403  the credentials may not read a symbol
        ├── UnknownSymbol       4404  no such symbol (or its instrument was disabled)
        └── PolicyViolation     1009, `too_many_subscriptions`: asked past a limit

Reconnecting cannot fix a StreamRefused, so `watch` raises it; everything else that ends a
connection (1001, 1011, 1013, 4408, a dropped network) it reconnects through.
"""

from __future__ import annotations

from enum import IntEnum


class CloseCode(IntEnum):
    """Every code a pricefeed stream closes with but 1000 (tests/sdk checks these are the
    server's own)."""

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


class PricefeedError(Exception):
    """Something the service refused, or answered in a way the client cannot use."""


class ApiError(PricefeedError):
    """A REST answer other than 2xx; `code` is the service's word for it (`unknown_symbol`)."""

    def __init__(self, status: int, detail: str, code: str = "") -> None:
        self.status, self.detail, self.code = status, detail, code
        super().__init__(f"HTTP {status}" + (f" {code}" if code else "") + f": {detail}")


class ProtocolError(PricefeedError):
    """A frame or body that does not have the shape the protocol gives it."""


class StreamRefused(PricefeedError):
    """A stream closed in a way that reconnecting cannot fix."""

    def __init__(self, code: int, reason: str) -> None:
        self.code, self.reason = code, reason
        super().__init__(f"stream closed with {code}: {reason or 'no reason given'}")


class Unauthorized(StreamRefused):
    """4401: the service refused the token, and then a freshly fetched one."""


class NotEntitled(StreamRefused):
    """4403: the credentials are not entitled to a symbol asked for."""


class UnknownSymbol(StreamRefused):
    """4404, or the multiplexed route's `unknown_symbol` error for every symbol watched."""


class PolicyViolation(StreamRefused):
    """A request that breaks one of the service's limits (too many subscriptions, a frame too
    big): asking again the same way gets the same answer."""


_REFUSALS: dict[int, type[StreamRefused]] = {
    CloseCode.BAD_TOKEN: Unauthorized,
    CloseCode.NOT_ENTITLED: NotEntitled,
    CloseCode.UNKNOWN_SYMBOL: UnknownSymbol,
    CloseCode.TOO_BIG: PolicyViolation,
}


def refusal(code: int, reason: str) -> StreamRefused:
    """The exception for a close code reconnecting cannot fix."""
    return _REFUSALS.get(code, StreamRefused)(code, reason)
