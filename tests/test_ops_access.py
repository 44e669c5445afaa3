"""Operator pages an operator may close in production: `/metrics` behind METRICS_TOKEN, and
the API docs and schema hidden with DOCS_PUBLIC=false. Both open by default."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import httpx
import pytest

from tests.support import token

ApiFactory = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]

METRICS_TOKEN = "scrape-me-0123456789abcdef"
DOCS_PATHS = [
    "/docs",
    "/redoc",
    "/openapi.json",
    "/docs/oauth2-redirect",
    "/static/docs/swagger-ui.css",
]


class TestMetricsToken:
    async def test_open_without_a_metrics_token(self, api: ApiFactory) -> None:
        async with api() as client:
            response = await client.get("/metrics")

        assert response.status_code == 200
        assert "pricefeed_" in response.text

    @pytest.mark.parametrize(
        "authorization",
        [
            pytest.param(None, id="none"),
            pytest.param(f"Bearer {METRICS_TOKEN}x", id="wrong-token"),
            pytest.param(f"Basic {METRICS_TOKEN}", id="wrong-scheme"),
            pytest.param(f"Bearer {token()}", id="an-api-access-token"),
        ],
    )
    async def test_set_it_refuses_anything_else_with_401(
        self, api: ApiFactory, authorization: str | None
    ) -> None:
        headers = {"Authorization": authorization} if authorization else {}
        async with api(env="prod", metrics_token=METRICS_TOKEN) as client:
            response = await client.get("/metrics", headers=headers)

        assert response.status_code == 401
        assert response.json()["code"] == "unauthenticated"
        assert response.headers["www-authenticate"] == "Bearer"
        assert "pricefeed_" not in response.text

    async def test_set_it_opens_to_its_bearer(self, api: ApiFactory) -> None:
        async with api(env="prod", metrics_token=METRICS_TOKEN) as client:
            response = await client.get(
                "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
            )

        assert response.status_code == 200
        assert "pricefeed_" in response.text


class TestDocsPublic:
    @pytest.mark.parametrize("path", DOCS_PATHS)
    async def test_public_by_default(self, api: ApiFactory, path: str) -> None:
        async with api(env="prod") as client:
            response = await client.get(path)

        assert response.status_code == 200

    @pytest.mark.parametrize("path", DOCS_PATHS)
    async def test_hidden_they_answer_404(self, api: ApiFactory, path: str) -> None:
        async with api(env="prod", docs_public=False) as client:
            response = await client.get(path)
            health = await client.get("/healthz")
            prices = await client.get("/v1/symbols", headers={"Authorization": f"Bearer {token()}"})

        assert response.status_code == 404
        assert response.json()["code"] == "not_found"
        assert (health.status_code, prices.status_code) == (200, 200)
