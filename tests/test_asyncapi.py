"""`/asyncapi.json`: an AsyncAPI 3.0.0 document of the streams, valid against the official
schema, linked from /docs, built from the SDK's message classes, and true to what a real
server sends (here directly; and for every frame the whole suite receives, tests/frames.py)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
import pytest
from pricefeed_client import CloseCode as SdkCloseCode
from pricefeed_client import Tick
from pricefeed_client.messages import ErrorFrame, Subscribe

from app.errors import CloseCode
from tests import frames
from tests.prices.test_sse import open_events
from tests.support import LiveApp, open_stream, token

ApiFactory = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]
LiveFactory = Callable[..., AbstractAsyncContextManager[LiveApp]]
CONTRACT_CLOSE_CODES = {1001, 1008, 1009, 1013, 4401, 4403, 4404, 4408}


@pytest.fixture
async def document(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/asyncapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    return body


class TestDocument:
    async def test_it_is_a_valid_asyncapi_3_document(self, document: dict[str, Any]) -> None:
        validator = frames.asyncapi_validator()
        assert [e.message for e in validator.iter_errors(document)] == []
        broken = copy.deepcopy(document)
        broken["operations"]["sendPrices"]["action"] = "publish"  # AsyncAPI 2's word
        assert not validator.is_valid(broken), "the schema is strict enough to notice"

    async def test_it_has_both_websocket_routes_and_sse(self, document: dict[str, Any]) -> None:
        addresses = {c["address"] for c in document["channels"].values()}
        assert addresses == {"/v1/ws/prices/{symbol}", "/v1/ws", "/v1/stream"}

    async def test_every_message_each_way(self, document: dict[str, Any]) -> None:
        def names(action: str, channel: str) -> set[str]:
            return {
                ref["$ref"].rsplit("/", 1)[-1]
                for op in document["operations"].values()
                if op["action"] == action and op["channel"]["$ref"] == f"#/channels/{channel}"
                for ref in op["messages"]
            }

        assert names("receive", "multiplexed") == {"subscribe", "unsubscribe", "ping", "auth"}
        assert names("send", "multiplexed") == {
            "subscribed", "unsubscribed", "snapshot", "tick", "batch", "pong", "heartbeat",
            "authenticated", "error",
        }  # fmt: skip
        assert names("send", "prices") == {"snapshot", "tick", "error"}
        assert names("send", "events") == {"sseSnapshot", "sseTick", "sseError"}

    async def test_close_codes_are_the_servers(self, document: dict[str, Any]) -> None:
        for name in ("prices", "multiplexed"):
            codes = document["channels"][name]["x-close-codes"]
            assert CONTRACT_CLOSE_CODES <= {int(c) for c in codes}
            assert codes["4408"] == CloseCode.TOKEN_EXPIRED.meaning

    async def test_docs_link_it(self, client: httpx.AsyncClient) -> None:
        description = (await client.get("/openapi.json")).json()["info"]["description"]
        assert "(/asyncapi.json)" in description


class TestOneDefinitionForBothEnds:
    """The spec's shapes are the SDK's dataclasses, field for field."""

    async def test_each_schema_has_the_fields_of_its_sdk_class(
        self, document: dict[str, Any]
    ) -> None:
        schemas = document["components"]["schemas"]
        for shape in (Tick, Subscribe, ErrorFrame):
            fields = {f.name for f in dataclasses.fields(shape)}
            assert set(schemas[shape.__name__]["properties"]) == fields, shape.__name__

    def test_the_sdk_knows_every_close_code_of_the_server(self) -> None:
        assert {c.name: c.value for c in SdkCloseCode} == {c.name: c.value for c in CloseCode}

    async def test_a_price_as_a_float_breaks_the_spec(self, document: dict[str, Any]) -> None:
        tick = {"type": "tick", "symbol": "AAPL", "price": "189.23", "ts": 1, "seq": 2}
        assert frames.problems(document, [("multiplexed", tick)]) == []
        assert frames.problems(document, [("multiplexed", {**tick, "price": 189.23})])


class TestWhatARealServerSends:
    async def test_every_frame_of_a_multiplexed_session(
        self, live: LiveFactory, document: dict[str, Any]
    ) -> None:
        received: list[Any] = []
        async with (
            live(ws_heartbeat_seconds=0.2) as server,
            open_stream(f"{server.ws}/v1/ws?token={token()}") as ws,
        ):
            for request in (
                {"op": "subscribe", "symbols": ["AAPL", "msft"], "batch": True},
                {"op": "ping"},
                {"op": "auth", "token": token()},
                {"op": "subscribe", "symbols": ["NOPE"]},
                {"op": "subscribe", "symbols": [""]},
                {"op": "dance"},
                {"op": "unsubscribe", "symbols": ["AAPL", "MSFT"]},
            ):
                await ws.send(request)
            kinds: set[str] = set()
            while not {"heartbeat", "unsubscribed", "authenticated", "pong", "error"} <= kinds:
                raw = await ws.conn.recv()
                received.append(body := httpx.Response(200, content=raw).json())
                kinds |= {f["type"] for f in (body if isinstance(body, list) else [body])}
        errors = {f["code"] for f in received if isinstance(f, dict) and f["type"] == "error"}
        assert errors >= {"unknown_symbol", "invalid_request", "unknown_op"}
        assert frames.problems(document, [("multiplexed", b) for b in received]) == []

    async def test_every_frame_of_a_one_symbol_stream(
        self, live: LiveFactory, document: dict[str, Any]
    ) -> None:
        async with (
            live() as server,
            open_stream(f"{server.ws}/v1/ws/prices/AAPL?token={token()}") as ws,
        ):
            received = [await ws.recv() for _ in range(5)]
        assert received[0]["type"] == "snapshot"
        assert frames.problems(document, [("prices", b) for b in received]) == []

    async def test_every_event_of_an_sse_stream(
        self, live: LiveFactory, document: dict[str, Any]
    ) -> None:
        async with live() as server, httpx.AsyncClient(base_url=server.http, timeout=5) as http:
            params = {"symbols": "AAPL,MSFT", "token": token()}
            async with open_events(http, params) as events:
                received = [(await events.next()).data for _ in range(6)]
        assert {e["type"] for e in received} == {"snapshot", "tick"}
        assert frames.problems(document, [("events", e) for e in received]) == []


REQUESTS = [  # (request, whether the spec allows it)
    ({"op": "subscribe", "symbols": ["AAPL"], "since": {"AAPL": 1}, "batch": True}, True),
    ({"op": "subscribe", "symbols": ["MSFT"], "since": None, "batch": None}, True),
    ({"op": "unsubscribe", "symbols": ["MSFT"]}, True),
    ({"op": "ping"}, True),
    ({"op": "subscribe", "symbols": "AAPL"}, False),
    ({"op": "subscribe", "symbols": [42]}, False),
    ({"op": "subscribe"}, False),
    ({"op": "subscribe", "symbols": ["AAPL"], "since": {"AAPL": "1"}}, False),
    ({"op": "subscribe", "symbols": ["AAPL"], "since": {"AAPL": 1.5}}, False),
    ({"op": "subscribe", "symbols": ["AAPL"], "batch": 1}, False),
    ({"op": "auth", "token": 5}, False),
    ({"op": "auth"}, False),
]


async def test_the_server_refuses_exactly_the_requests_the_spec_does_not_allow(
    live: LiveFactory, document: dict[str, Any]
) -> None:
    """The service validates requests with the same dataclasses the spec is built from."""
    import jsonschema_rs

    messages = document["components"]["messages"]
    spec = jsonschema_rs.validator_for(
        {
            "anyOf": [messages[n]["payload"] for n in ("subscribe", "unsubscribe", "ping", "auth")],
            "components": document["components"],
        }
    )
    assert [spec.is_valid(r) for r, _ in REQUESTS] == [allowed for _, allowed in REQUESTS]
    async with (
        live() as server,
        open_stream(f"{server.ws}/v1/ws?token={token()}") as ws,
    ):
        refused = []
        for request, _ in REQUESTS:
            await ws.send(request)
            await ws.send({"op": "mark"})  # answered unknown_op: all before it answered `request`
            answers = []
            while (frame := await ws.recv_type("pong", "error", "subscribed", "unsubscribed")).get(
                "code"
            ) != "unknown_op":
                answers.append(frame)
            refused.append(any(f.get("code") == "invalid_message" for f in answers))
    assert refused == [not allowed for _, allowed in REQUESTS]
