"""The stream protocol as an AsyncAPI 3 document (`/asyncapi.json`): both WebSocket routes and
Server-Sent Events, every message each way, and the close codes.

The message shapes are the SDK's (`pricefeed_client.messages`, `pricefeed_client.Tick`):
frozen dataclasses that the client parses frames into and the service checks requests with
(app/prices/ws.py), turned into JSON Schema here by pydantic. One definition for all three,
so the document cannot say one thing while the client or the service does another. The
server's own close codes (app/errors.py CloseCode) fill the close-code tables. The document
describes the service: `send` is what it sends, `receive` what it takes.
tests/test_asyncapi.py validates it against the AsyncAPI 3.0.0 schema, and every frame the
test suite receives against it."""

from __future__ import annotations

from functools import cache
from typing import Any

from pricefeed_client import Tick
from pricefeed_client.messages import (
    Auth,
    Authenticated,
    ErrorFrame,
    Heartbeat,
    Ping,
    Pong,
    SseError,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
)
from pydantic import TypeAdapter

from app.errors import CloseCode

SCHEMAS = "#/components/schemas/{model}"
_SHAPES: list[type] = [
    Tick,
    Subscribe,
    Unsubscribe,
    Ping,
    Auth,
    Subscribed,
    Unsubscribed,
    Pong,
    Heartbeat,
    Authenticated,
    ErrorFrame,
    SseError,
]
# name: (schema, title); what each message is on the wire
_MESSAGES: dict[str, tuple[dict[str, Any], str]] = {
    "snapshot": (
        {
            "allOf": [
                {"$ref": "#/components/schemas/Tick"},
                {"properties": {"type": {"const": "snapshot"}}},
            ]
        },
        "The latest tick, first on each subscription (or after a resume that went past what "
        'can be replayed). `"reset": true`: ticks between the last one seen and this are gone.',
    ),
    "tick": (
        {
            "allOf": [
                {"$ref": "#/components/schemas/Tick"},
                {"properties": {"type": {"const": "tick"}}},
            ]
        },
        "A price, in `seq` order per symbol, each at most once.",
    ),
    "batch": (
        {"type": "array", "minItems": 2, "items": {"$ref": "#/components/schemas/Tick"}},
        'Several ticks/snapshots in one frame, for a client that subscribed with `"batch": true`.',
    ),
    "subscribe": ({"$ref": "#/components/schemas/Subscribe"}, "Subscribe to symbols."),
    "unsubscribe": ({"$ref": "#/components/schemas/Unsubscribe"}, "Unsubscribe from symbols."),
    "ping": ({"$ref": "#/components/schemas/Ping"}, "Ask for a `pong`."),
    "auth": ({"$ref": "#/components/schemas/Auth"}, "Replace the token before it expires."),
    "subscribed": ({"$ref": "#/components/schemas/Subscribed"}, "A subscribe accepted."),
    "unsubscribed": ({"$ref": "#/components/schemas/Unsubscribed"}, "Symbols no longer sent."),
    "pong": ({"$ref": "#/components/schemas/Pong"}, "The answer to a `ping`."),
    "heartbeat": ({"$ref": "#/components/schemas/Heartbeat"}, "Sent when idle."),
    "authenticated": ({"$ref": "#/components/schemas/Authenticated"}, "An `auth` accepted."),
    "error": (
        {"$ref": "#/components/schemas/ErrorFrame"},
        "A bad request; the connection stays open.",
    ),
    "sseSnapshot": (
        {
            "allOf": [
                {"$ref": "#/components/schemas/Tick"},
                {"properties": {"type": {"const": "snapshot"}}},
            ]
        },
        "`event: snapshot`, `id: SYMBOL:seq`, `data:` this JSON: the latest tick of a symbol.",
    ),
    "sseTick": (
        {
            "allOf": [
                {"$ref": "#/components/schemas/Tick"},
                {"properties": {"type": {"const": "tick"}}},
            ]
        },
        "`event: tick`, `id: SYMBOL:seq`, `data:` this JSON. `Last-Event-ID` resumes after it.",
    ),
    "sseError": (
        {"$ref": "#/components/schemas/SseError"},
        "`event: error`, `data:` this JSON: the stream ends (but for `unknown_symbol` while "
        "other symbols remain).",
    ),
}
_WS_CLOSE = [1001, 1008, 1009, 1011, 1013, 4401, 4403, 4404, 4408]
_TOKEN = {"type": "string", "description": "The JWT, for browsers; else `Authorization: Bearer`"}
_SINCE = {"type": "string", "pattern": "^[0-9]+$", "description": "Resume after this seq"}


def _channel(
    address: str, description: str, messages: list[str], *, close_codes: bool = True, **more: Any
) -> dict[str, Any]:
    channel: dict[str, Any] = {
        "address": address,
        "description": description,
        "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in messages},
        **more,
    }
    if close_codes:
        channel["x-close-codes"] = {
            str(code.value): code.meaning for code in CloseCode if code.value in _WS_CLOSE
        }
    return channel


def _operation(action: str, channel: str, messages: list[str], summary: str) -> dict[str, Any]:
    return {
        "action": action,
        "channel": {"$ref": f"#/channels/{channel}"},
        "summary": summary,
        "messages": [{"$ref": f"#/channels/{channel}/messages/{name}"} for name in messages],
    }


def _schemas() -> dict[str, Any]:
    """Each shape's JSON Schema under its class name, the refs between them pointing there."""
    _, top = TypeAdapter.json_schemas(
        [(shape.__name__, "validation", TypeAdapter(shape)) for shape in _SHAPES],
        ref_template=SCHEMAS,
    )
    schemas: dict[str, Any] = top["$defs"]
    return schemas


SERVER_SENT = ["snapshot", "tick", "batch", "subscribed", "unsubscribed", "pong", "heartbeat",
               "authenticated", "error"]  # fmt: skip


@cache
def build_asyncapi(version: str) -> dict[str, Any]:
    """The document (built once per version; it depends on nothing at run time)."""
    one_symbol = ["snapshot", "tick", "error"]
    requests = ["subscribe", "unsubscribe", "ping", "auth"]
    return {
        "asyncapi": "3.0.0",
        "id": "urn:pricefeed:streams",
        "info": {
            "title": "pricefeed streams",
            "version": version,
            "description": (
                "Live prices over WebSocket and Server-Sent Events. Token: `Authorization: "
                "Bearer <jwt>` or `?token=<jwt>`, from `POST /v1/auth/token` (see /docs). "
                "A tick's `seq` is +1 per tick of its symbol: a jump is a gap, which "
                "`/v1/prices/{symbol}/history?since=` fills. Close codes: each WebSocket "
                "channel's `x-close-codes`."
            ),
        },
        "defaultContentType": "application/json",
        "channels": {
            "prices": _channel(
                "/v1/ws/prices/{symbol}",
                "One symbol: a snapshot (or, with `since`, the retained ticks after it), then "
                "every tick. Takes no requests.",
                one_symbol,
                parameters={"symbol": {"description": "e.g. AAPL, BTC-USD (any case)"}},
                bindings={
                    "ws": {
                        "query": {
                            "type": "object",
                            "properties": {"token": _TOKEN, "since": _SINCE},
                        },
                        "bindingVersion": "0.1.0",
                    }
                },
            ),
            "multiplexed": _channel(
                "/v1/ws",
                "Many symbols over one connection, driven by JSON requests.",
                [*SERVER_SENT, *requests],
                bindings={
                    "ws": {
                        "query": {"type": "object", "properties": {"token": _TOKEN}},
                        "bindingVersion": "0.1.0",
                    }
                },
            ),
            "events": _channel(
                "/v1/stream",
                "Server-Sent Events (`GET /v1/stream?symbols=AAPL,MSFT`, `text/event-stream`): "
                "a snapshot per symbol, then ticks; `Last-Event-ID: SYMBOL:seq` resumes that "
                "symbol. Refusals are HTTP answers (401, 403, 404, 429, 503: see /docs).",
                ["sseSnapshot", "sseTick", "sseError"],
                close_codes=False,
            ),
        },
        "operations": {
            "sendPrices": _operation("send", "prices", one_symbol, "Ticks of one symbol"),
            "sendMultiplexed": _operation(
                "send", "multiplexed", SERVER_SENT, "Ticks and answers on /v1/ws"
            ),
            "receiveRequests": _operation(
                "receive", "multiplexed", requests, "Requests a client sends on /v1/ws"
            ),
            "sendEvents": _operation(
                "send", "events", ["sseSnapshot", "sseTick", "sseError"], "Server-Sent Events"
            ),
        },
        "components": {
            "schemas": _schemas(),
            "messages": {
                name: {"name": name, "summary": summary, "payload": payload}
                for name, (payload, summary) in _MESSAGES.items()
            },
        },
    }
