"""Every HTTP error has one shape, `{"detail": "<one line>", "code": "<word>"}` (app/errors.py),
validation errors, unknown routes and unexpected failures included, and the OpenAPI schema
documents the 422 one."""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
import pytest

from app.main import create_app
from tests.support import make_settings, token

ApiFactory = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


BAD_REQUESTS = [
    pytest.param("/v1/prices/AAPL/history?limit=abc", "limit", "valid integer", id="not-a-number"),
    pytest.param("/v1/prices/AAPL/history?limit=0", "limit", "greater than", id="history-limit"),
    pytest.param("/v1/prices/AAPL/candles?limit=0", "limit", "greater than", id="candles-limit"),
    pytest.param("/v1/prices/AAPL/candles?interval=2m", "interval", "'1m'", id="interval"),
    pytest.param("/v1/prices", "symbols", "required", id="missing"),
    pytest.param("/v1/stream?symbols=", "symbols", "at least 1", id="stream-empty"),
]


class TestEveryErrorHasOneShape:
    """Every error is `{"detail": "<one line>", "code": "<word>"}`, as the README promises."""

    @pytest.mark.parametrize(("url", "name", "problem"), BAD_REQUESTS)
    async def test_a_bad_parameter_is_named_in_one_line(
        self, client: httpx.AsyncClient, url: str, name: str, problem: str
    ) -> None:
        response = await client.get(url, headers={"Authorization": f"Bearer {token()}"})

        assert response.status_code == 422
        body = response.json()
        assert body["code"] == "invalid_request"
        assert isinstance(body["detail"], str) and "\n" not in body["detail"]
        assert f"query parameter '{name}'" in body["detail"]
        assert problem in body["detail"]
        assert [e["loc"] for e in body["errors"]] == [["query", name]]

    async def test_a_bad_form_names_each_field(self, client: httpx.AsyncClient) -> None:
        response = await client.post("/v1/auth/token", data={"grant_type": "password"})

        assert response.status_code == 422
        body = response.json()
        assert body["code"] == "invalid_request"
        for field in ("grant_type", "client_id", "client_secret"):
            assert f"body field '{field}'" in body["detail"]

    async def test_what_was_sent_is_not_echoed(self, client: httpx.AsyncClient) -> None:
        """A too-long secret is refused without being written back (pydantic's `input`)."""
        secret = "s3cret-" * 50
        response = await client.post(
            "/v1/auth/token",
            data={"grant_type": "client_credentials", "client_id": "demo", "client_secret": secret},
        )

        assert response.status_code == 422
        assert "client_secret" in response.json()["detail"]
        assert "s3cret-" not in response.text

    async def test_unknown_route_is_404(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/v1/no-such-thing")

        assert response.status_code == 404
        assert response.json() == {"detail": "nothing at /v1/no-such-thing", "code": "not_found"}

    async def test_wrong_method_is_405_with_allow(self, client: httpx.AsyncClient) -> None:
        response = await client.delete("/v1/prices/AAPL")

        assert response.status_code == 405
        assert response.headers["allow"] == "GET"
        assert response.json() == {
            "detail": "DELETE is not allowed on /v1/prices/AAPL",
            "code": "method_not_allowed",
        }

    async def test_an_unexpected_failure_is_500_in_the_same_shape(self) -> None:
        app = create_app(make_settings("sqlite+aiosqlite:///./unused-by-this-route.db"))

        async def fail() -> None:
            raise RuntimeError("a bug")

        app.add_api_route("/fail", fail)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            response = await client.get("/fail")

        assert response.status_code == 500
        assert response.json() == {"detail": "unexpected server error", "code": "internal"}


class TestTheSchemaDocumentsIt:
    def test_422_is_documented_as_answered(self, openapi: dict[str, Any]) -> None:
        documented = set()
        for path, operations in openapi["paths"].items():
            for method, operation in operations.items():
                response = operation["responses"].get("422")
                if response is None:
                    continue
                documented.add(path)
                ref = response["content"]["application/json"]["schema"]["$ref"]
                schema = openapi["components"]["schemas"][ref.rsplit("/", 1)[-1]]
                assert schema["properties"]["detail"]["type"] == "string", (method, path)
                assert {"detail", "code"} <= set(schema["required"]), (method, path)
        # Every route that takes parameters or a body; none without (it cannot answer 422).
        assert documented == {
            "/v1/auth/token",
            "/v1/ingest",
            "/v1/prices",
            "/v1/prices/{symbol}",
            "/v1/prices/{symbol}/history",
            "/v1/prices/{symbol}/candles",
            "/v1/stream",
        }

    def test_fastapis_list_shape_is_gone(self, openapi: dict[str, Any]) -> None:
        assert "HTTPValidationError" not in str(openapi)

    def test_every_reference_resolves(self, openapi: dict[str, Any]) -> None:
        refs = set(re.findall(r"'#/components/schemas/([^']+)'", str(openapi)))

        assert refs - set(openapi["components"]["schemas"]) == set()
