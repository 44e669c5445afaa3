"""Every frame the test suite's WebSocket clients receive (tests/support.py `Stream`) is
checked against /asyncapi.json at the end of the run (tests/conftest.py), and must parse with
the SDK: a server that sends what its spec does not say fails the suite.

Recording is cheap: a frame is kept only while its shape (route, type, field names) has fewer
than EXAMPLES examples, so a long run holds a few hundred frames, validated in milliseconds."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

EXAMPLES = 3
SCHEMA_FILE = Path(__file__).parent / "asyncapi" / "asyncapi-3.0.0.json"
_seen: dict[tuple[str, str, frozenset[str]], list[Any]] = {}


def channel_of(path: str) -> str:
    """The AsyncAPI channel of a WebSocket request path."""
    path = path.split("?", 1)[0]
    return "multiplexed" if path == "/v1/ws" else "prices"


def record(channel: str, body: Any) -> None:
    """Keep `body` (one frame's JSON: an object, or a batch array; for the SSE channel
    `events`, an event's data) if its shape is new."""
    if isinstance(body, dict):
        key = (channel, str(body.get("type")), frozenset(body))
    else:
        key = (channel, "batch", frozenset())
    examples = _seen.setdefault(key, [])
    if len(examples) < EXAMPLES:
        examples.append(body)


def recorded() -> list[tuple[str, Any]]:
    return [(key[0], body) for key, bodies in _seen.items() for body in bodies]


@cache
def asyncapi_validator() -> Any:
    """A validator of documents against the official AsyncAPI 3.0.0 JSON Schema (vendored,
    with its licence, in tests/asyncapi/)."""
    import jsonschema_rs

    return jsonschema_rs.validator_for(json.loads(SCHEMA_FILE.read_text()))


def sent_validator(document: dict[str, Any], channel: str) -> Any:
    """A validator of one frame the service sends on `channel`: any of its `send` messages."""
    import jsonschema_rs

    names = [
        ref["$ref"].rsplit("/", 1)[-1]
        for op in document["operations"].values()
        if op["action"] == "send" and op["channel"]["$ref"] == f"#/channels/{channel}"
        for ref in op["messages"]
    ]
    messages = document["components"]["messages"]
    schema = {
        "anyOf": [messages[name]["payload"] for name in names],
        "components": document["components"],
    }
    return jsonschema_rs.validator_for(schema)


def problems(document: dict[str, Any], frames: list[tuple[str, Any]]) -> list[str]:
    """What is wrong with `frames` (channel, body): each one that the document does not allow,
    or that the SDK cannot parse."""
    from pricefeed_client import ProtocolError
    from pricefeed_client.messages import parse_frame

    validators: dict[str, Any] = {}
    found = []
    for channel, body in frames:
        validator = validators.get(channel) or validators.setdefault(
            channel, sent_validator(document, channel)
        )
        errors = [e.message for e in validator.iter_errors(body)]
        if errors:
            found.append(f"{channel}: {json.dumps(body)[:300]}: not in the spec")
        for item in body if isinstance(body, list) else [body]:
            if channel == "events" and "type" not in item:
                continue  # an SSE error: the SDK reads WebSocket errors only
            try:
                known = parse_frame(item) is not None
            except ProtocolError as exc:
                known, why = False, str(exc)
            else:
                why = "a type the SDK does not know"
            if not known:
                found.append(f"{channel}: {json.dumps(item)[:300]}: {why}")
    return found
