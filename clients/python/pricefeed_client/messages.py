"""Every message of the stream protocol, as frozen dataclasses: what a client sends on the
multiplexed WebSocket (`/v1/ws`), and every frame the service sends on either WebSocket route
and on Server-Sent Events (`/v1/stream`). Ticks and snapshots are `pricefeed_client.Tick`.

One definition serves both ends: the client parses frames with these, the service checks the
requests it gets with them and builds its AsyncAPI document (`/asyncapi.json`) from them, so
the spec can drift from neither.
Each field is the JSON field of the same name; a field with a default may be absent."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pricefeed_client.models import EpochMillis, Seq, Tick, WireSchema

SymbolName = Annotated[
    str,
    WireSchema(
        type="string",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9.\-]{0,15}$",
        description="Upper case on the wire; lower case input is normalised",
        examples=["AAPL", "BTC-USD"],
    ),
]
ErrorCode = Literal[
    "invalid_json",
    "invalid_message",
    "invalid_request",
    "unknown_op",
    "unknown_symbol",
    "too_many_subscriptions",
    "subject_mismatch",
    "unavailable",
]
SseErrorCode = Literal["going_away", "token_expired", "unauthenticated", "unknown_symbol"]


# ------------------------------------------------------------------ client → server (/v1/ws)


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscribe:
    """Start the symbols' streams: the retained ticks after each `since`, else a snapshot.
    `batch: true` lets the service send several ticks as one JSON array frame."""

    op: Literal["subscribe"]
    symbols: list[SymbolName]
    since: dict[str, Seq] | None = None
    batch: bool | None = None  # absent or null: as the connection's last subscribe said


@dataclass(frozen=True, slots=True, kw_only=True)
class Unsubscribe:
    """Stop the symbols' streams; no tick of them follows the answer."""

    op: Literal["unsubscribe"]
    symbols: list[SymbolName]


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping:
    """Answered with `pong`."""

    op: Literal["ping"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Auth:
    """Replace the connection's token before it expires (same subject)."""

    op: Literal["auth"]
    token: str


ClientMessage = Subscribe | Unsubscribe | Ping | Auth


def encode_request(message: ClientMessage) -> dict[str, Any]:
    """A request as the JSON object the service expects."""
    body: dict[str, Any] = {"op": message.op}
    if isinstance(message, Subscribe):
        body["symbols"] = message.symbols
        if message.since:
            body["since"] = message.since
        if message.batch is not None:
            body["batch"] = message.batch
    elif isinstance(message, Unsubscribe):
        body["symbols"] = message.symbols
    elif isinstance(message, Auth):
        body["token"] = message.token
    return body


# ------------------------------------------------------------------ server → client


@dataclass(frozen=True, slots=True, kw_only=True)
class Subscribed:
    """A subscribe was accepted; each new symbol's snapshot (or resumed ticks) follows."""

    type: Literal["subscribed"]
    symbols: list[SymbolName]


@dataclass(frozen=True, slots=True, kw_only=True)
class Unsubscribed:
    """No tick of these symbols follows: answered to an unsubscribe, or sent after an
    `unknown_symbol` error for an instrument disabled while subscribed."""

    type: Literal["unsubscribed"]
    symbols: list[SymbolName]


@dataclass(frozen=True, slots=True, kw_only=True)
class Pong:
    type: Literal["pong"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat:
    """Sent on a multiplexed connection that had nothing else to send for a while."""

    type: Literal["heartbeat"]
    ts: EpochMillis


@dataclass(frozen=True, slots=True, kw_only=True)
class Authenticated:
    """An `auth` request's new token is in force until `expires`."""

    type: Literal["authenticated"]
    expires: EpochMillis


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorFrame:
    """A bad request, answered without closing the connection. With `symbols`: those symbols
    were dropped (an instrument disabled while watched) and the others go on."""

    type: Literal["error"]
    code: ErrorCode
    message: str
    symbols: list[SymbolName] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class SseError:
    """`event: error` on Server-Sent Events: the stream ends, except for `unknown_symbol` while
    other symbols remain (those go on)."""

    code: SseErrorCode
    message: str
    symbols: list[SymbolName] | None = None


ControlFrame = Subscribed | Unsubscribed | Pong | Heartbeat | Authenticated | ErrorFrame
ServerFrame = Tick | ControlFrame


def parse_frame(body: Mapping[str, Any]) -> ServerFrame | None:
    """A frame the service sent on a WebSocket; None for a type this client does not know
    (a newer service may add some)."""
    kind = body.get("type")
    if kind in ("tick", "snapshot"):
        return Tick.from_json(body)
    if kind in ("subscribed", "unsubscribed"):
        symbols = _symbols(body.get("symbols"))
        if kind == "subscribed":
            return Subscribed(type="subscribed", symbols=symbols)
        return Unsubscribed(type="unsubscribed", symbols=symbols)
    if kind == "pong":
        return Pong(type="pong")
    if kind == "heartbeat" and isinstance(body.get("ts"), int):
        return Heartbeat(type="heartbeat", ts=body["ts"])
    if kind == "authenticated" and isinstance(body.get("expires"), int):
        return Authenticated(type="authenticated", expires=body["expires"])
    if kind == "error":
        raw = body.get("symbols")
        return ErrorFrame(
            type="error",
            code=body.get("code"),  # type: ignore[arg-type]  # a newer code is kept as it came
            message=str(body.get("message", "")),
            symbols=None if raw is None else _symbols(raw),
        )
    return None


def _symbols(value: object) -> list[str]:
    if not isinstance(value, list):
        return []
    return [s for s in value if isinstance(s, str)]
