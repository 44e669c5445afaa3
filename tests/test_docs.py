"""The docs a client developer reads: `/docs`, `/openapi.json` (with the WebSocket protocol in
its description, app/prices/protocol.md) and the price board at `/`."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
import pytest

from app.main import create_app
from tests.support import make_settings

ApiFactory = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]

REST_PATHS = {
    "/v1/auth/token": "post",
    "/v1/symbols": "get",
    "/v1/prices": "get",
    "/v1/prices/{symbol}": "get",
    "/v1/prices/{symbol}/history": "get",
    "/v1/prices/{symbol}/candles": "get",
    "/v1/stream": "get",
    "/healthz": "get",
    "/readyz": "get",
    "/metrics": "get",
}
WS_ROUTES = ["/v1/ws/prices/{symbol}", "/v1/ws"]
OPS = ["subscribe", "unsubscribe", "ping", "auth"]
SERVER_MESSAGES = ["subscribed", "snapshot", "tick", "unsubscribed", "pong", "heartbeat", "error"]
CLOSE_CODES = [1001, 1008, 1009, 1013, 4401, 4403, 4404, 4408]


@pytest.fixture
async def client(api: ApiFactory) -> AsyncIterator[httpx.AsyncClient]:
    async with api() as client:
        yield client


@pytest.fixture(scope="module")
def openapi() -> dict[str, Any]:
    """The schema `/openapi.json` serves (TestOpenApi checks they are the same); building it
    needs no database, so it is built once for the module."""
    app = create_app(make_settings("sqlite+aiosqlite:///./unused-by-the-schema.db"))
    return app.openapi()


class TestDocsPage:
    async def test_swagger_ui(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/docs")

        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        assert "/openapi.json" in response.text


class TestOpenApi:
    async def test_served_at_openapi_json(
        self, client: httpx.AsyncClient, openapi: dict[str, Any]
    ) -> None:
        response = await client.get("/openapi.json")

        assert response.status_code == 200
        assert response.json() == openapi

    def test_lists_every_rest_route(self, openapi: dict[str, Any]) -> None:
        paths = openapi["paths"]
        for path, method in REST_PATHS.items():
            assert path in paths, path
            assert method in paths[path], f"{method.upper()} {path}"

    def test_routes_have_a_summary_text(self, openapi: dict[str, Any]) -> None:
        for path, method in REST_PATHS.items():
            operation = openapi["paths"][path][method]
            assert operation.get("description") or operation.get("summary"), path

    def test_protected_routes_document_401_and_403(self, openapi: dict[str, Any]) -> None:
        for path in (
            "/v1/prices/{symbol}",
            "/v1/prices",
            "/v1/prices/{symbol}/history",
            "/v1/prices/{symbol}/candles",
        ):
            responses = openapi["paths"][path]["get"]["responses"]
            assert {"200", "401", "403"} <= set(responses), path

    def test_token_endpoint_takes_a_form(self, openapi: dict[str, Any]) -> None:
        body = openapi["paths"]["/v1/auth/token"]["post"]["requestBody"]["content"]

        assert "application/x-www-form-urlencoded" in body


class TestWebSocketProtocolDocs:
    @pytest.fixture
    def description(self, openapi: dict[str, Any]) -> str:
        text: str = openapi["info"]["description"]
        return text

    @pytest.mark.parametrize("route", WS_ROUTES)
    def test_documents_both_routes(self, description: str, route: str) -> None:
        assert re.search(rf"WS {re.escape(route)}[\s`?\[]", description), route

    @pytest.mark.parametrize("op", OPS)
    def test_documents_every_op(self, description: str, op: str) -> None:
        assert re.search(rf'"op":\s*"{op}"', description), op

    @pytest.mark.parametrize("message", SERVER_MESSAGES)
    def test_documents_every_server_message(self, description: str, message: str) -> None:
        assert re.search(rf'"type":\s*"{message}"', description), message

    @pytest.mark.parametrize("code", CLOSE_CODES)
    def test_documents_every_close_code(self, description: str, code: int) -> None:
        assert re.search(rf"\|\s*{code}\s*\|", description), code

    def test_documents_sse(self, description: str) -> None:
        assert "/v1/stream" in description
        assert "Last-Event-ID" in description


class TestPriceBoard:
    async def test_board_page(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/")

        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        assert "<html" in response.text.lower()
        assert "/v1/ws" in response.text  # it streams over the multiplexed WebSocket

    async def test_dev_board_offers_the_demo_client(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/")

        assert '"demoClientId":"demo"' in response.text
        assert '"demoClientSecret":"demo-secret"' in response.text

    async def test_prod_board_shows_no_secret(self, api: ApiFactory) -> None:
        secret = "a-prod-demo-secret-0123456789"
        async with api(env="prod", demo_client_secret=secret) as client:
            response = await client.get("/")

        assert response.status_code == 200
        assert secret not in response.text
        assert '"demoClientSecret":""' in response.text

    def test_board_is_not_in_the_api_schema(self, openapi: dict[str, Any]) -> None:
        assert "/" not in openapi["paths"]
