"""The docs a client developer reads: `/docs` and `/redoc` (working with no internet access),
`/openapi.json` (with the WebSocket protocol in its description, app/prices/protocol.md, and a
bearer scheme for the Authorize button), and the price board at `/`. The error shape:
tests/test_error_shape.py."""

from __future__ import annotations

import asyncio
import re
import struct
import zlib
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.chromium import CHROMIUM, NEEDS_CHROMIUM
from tests.chromium import FLAGS as CHROMIUM_FLAGS
from tests.support import ROOT, LiveApp, token

ApiFactory = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]
LiveFactory = Callable[..., AbstractAsyncContextManager[LiveApp]]

REST_PATHS = {
    "/v1/auth/token": "post",
    "/v1/symbols": "get",
    "/v1/prices": "get",
    "/v1/prices/{symbol}": "get",
    "/v1/prices/{symbol}/history": "get",
    "/v1/prices/{symbol}/candles": "get",
    "/v1/stream": "get",
    "/v1/ingest": "post",
    "/healthz": "get",
    "/readyz": "get",
    "/metrics": "get",
}
WS_ROUTES = ["/v1/ws/prices/{symbol}", "/v1/ws"]
OPS = ["subscribe", "unsubscribe", "ping", "auth"]
SERVER_MESSAGES = ["subscribed", "snapshot", "tick", "unsubscribed", "pong", "heartbeat", "error"]
# The contract's close codes, written out on purpose: the page renders CloseCode's table
# (tests/test_close_codes.py), and this catches a code the contract has that the enum lost.
CONTRACT_CLOSE_CODES = [1001, 1008, 1009, 1013, 4401, 4403, 4404, 4408]


ASSETS = ROOT / "app" / "static" / "docs"
DOCS_PAGES = ["/docs", "/redoc"]
CONTENT_TYPES = {
    ".js": ("text/javascript", "application/javascript"),
    ".css": ("text/css",),
    ".png": ("image/png",),
}
ASSET_LINK = re.compile(r"""(?:src|href)=["']([^"']+)["']""")
PROTECTED = [
    ("/v1/symbols", "get"),
    ("/v1/prices", "get"),
    ("/v1/prices/{symbol}", "get"),
    ("/v1/prices/{symbol}/history", "get"),
    ("/v1/prices/{symbol}/candles", "get"),
    ("/v1/stream", "get"),
]
# Locked too, and with a scope: its security names `publish`.
SCOPED = [("/v1/ingest", "post")]
PUBLIC = [("/v1/auth/token", "post"), ("/healthz", "get"), ("/readyz", "get"), ("/metrics", "get")]


class TestDocsPage:
    async def test_swagger_ui(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/docs")

        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        assert "/openapi.json" in response.text

    @pytest.mark.parametrize("page", DOCS_PAGES)
    async def test_loads_nothing_from_the_internet(
        self, client: httpx.AsyncClient, page: str
    ) -> None:
        response = await client.get(page)

        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        assert "/openapi.json" in response.text
        assert "cdn.jsdelivr.net" not in response.text
        assert "fonts.googleapis" not in response.text
        links = ASSET_LINK.findall(response.text)
        assert links, "the page loads no script at all"
        assert [link for link in links if not link.startswith("/")] == []

    @pytest.mark.parametrize("page", DOCS_PAGES)
    async def test_serves_every_asset_it_links_to(
        self, client: httpx.AsyncClient, page: str
    ) -> None:
        links = ASSET_LINK.findall((await client.get(page)).text)

        for link in links:
            response = await client.get(link)
            assert response.status_code == 200, link
            media_type = response.headers["content-type"].split(";")[0]
            assert media_type in CONTENT_TYPES[Path(link).suffix], link
            assert response.content == (ASSETS / Path(link).name).read_bytes(), link

    async def test_swagger_ui_has_its_oauth2_redirect_page(self, client: httpx.AsyncClient) -> None:
        page = (await client.get("/docs")).text
        (redirect,) = re.findall(r"oauth2RedirectUrl: window.location.origin \+ '([^']+)'", page)

        response = await client.get(redirect)

        assert response.status_code == 200
        assert "swaggerUIRedirectOauth2" in response.text

    def test_the_assets_name_their_package_version_and_license(self) -> None:
        readme = (ASSETS / "README.md").read_text(encoding="utf-8")

        for name in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
            assert name in readme
        assert re.search(r"swagger-ui-dist@5\.\d+\.\d+", readme)
        assert re.search(r"redoc@2\.\d+\.\d+", readme)
        for license_file in re.findall(r"`([\w.-]+\.(?:LICENSE|NOTICE)\.txt)`", readme):
            assert (ASSETS / license_file).is_file(), license_file


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

    def test_ingest_documents_its_scope_body_and_every_error(self, openapi: dict[str, Any]) -> None:
        operation = openapi["paths"]["/v1/ingest"]["post"]

        assert operation["security"] == [{"bearer": ["publish"]}]
        body = operation["requestBody"]["content"]["application/json"]
        assert body["schema"]["properties"]["quotes"]["maxItems"] == 1000
        quote = body["schema"]["properties"]["quotes"]["items"]
        assert set(quote["required"]) == {"symbol", "price"}
        assert quote["additionalProperties"] is False
        assert body["example"]["quotes"][0] == {"symbol": "AAPL", "price": "189.23"}
        responses = operation["responses"]
        assert {"202", "401", "403", "413", "422", "503"} <= set(responses)
        bad = responses["422"]["content"]["application/json"]["example"]
        assert bad["errors"][0]["loc"] == ["body", "quotes", 3, "price"]
        assert "Retry-After" in responses["503"]["headers"]

    def test_token_endpoint_takes_a_form(self, openapi: dict[str, Any]) -> None:
        body = openapi["paths"]["/v1/auth/token"]["post"]["requestBody"]["content"]

        assert "application/x-www-form-urlencoded" in body


class TestAuthorizeButton:
    """Swagger UI shows Authorize for a security scheme, and a lock on each route that uses it;
    "Try it out" then sends `Authorization: Bearer <token>`."""

    @pytest.fixture
    def bearer(self, openapi: dict[str, Any]) -> str:
        schemes = openapi["components"]["securitySchemes"]
        (name,) = [n for n, s in schemes.items() if s["type"] == "http" and s["scheme"] == "bearer"]
        return name

    @pytest.mark.parametrize(("path", "method"), PROTECTED)
    def test_protected_routes_carry_the_lock(
        self, openapi: dict[str, Any], bearer: str, path: str, method: str
    ) -> None:
        assert openapi["paths"][path][method].get("security") == [{bearer: []}]

    @pytest.mark.parametrize(("path", "method"), PUBLIC)
    def test_public_routes_carry_none(
        self, openapi: dict[str, Any], path: str, method: str
    ) -> None:
        assert "security" not in openapi["paths"][path][method]

    def test_no_lock_for_the_whole_api(self, openapi: dict[str, Any]) -> None:
        assert "security" not in openapi

    def test_pages_are_not_in_the_schema(self, openapi: dict[str, Any]) -> None:
        assert {"/", "/docs", "/redoc", "/openapi.json"} & set(openapi["paths"]) == set()

    async def test_a_token_as_the_button_sends_it_is_accepted(
        self, client: httpx.AsyncClient
    ) -> None:
        response = await client.get("/v1/symbols", headers={"Authorization": f"Bearer {token()}"})

        assert response.status_code == 200

    async def test_without_one_the_answer_stays_our_401(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/v1/symbols")

        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json() == {
            "detail": "a bearer token is required",
            "code": "unauthenticated",
        }


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

    @pytest.mark.parametrize("code", CONTRACT_CLOSE_CODES)
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
        # It streams through the JavaScript client (tests/prices/test_board.py).
        assert 'import { PricefeedClient } from "/static/pricefeed.js?v=' in response.text

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


OPBLOCK_PATH = re.compile(r'data-path="([^"]+)"')


async def render(url: str, directory: Path) -> tuple[str, Path]:
    """The page as headless Chromium renders it: its DOM after the scripts ran, and a
    screenshot. Every host name fails to resolve: what renders came from the app alone."""
    screenshot = directory / "page.png"
    process = await asyncio.create_subprocess_exec(
        str(CHROMIUM),
        *CHROMIUM_FLAGS,
        f"--user-data-dir={directory / 'profile'}",
        f"--screenshot={screenshot}",
        "--window-size=1280,2000",
        "--virtual-time-budget=10000",
        "--dump-dom",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        dom, errors = await asyncio.wait_for(process.communicate(), 60)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, errors.decode(errors="replace")[-2000:]
    return dom.decode(), screenshot


def png_size_and_variety(path: Path) -> tuple[int, int, int]:
    """Width, height, and how many distinct byte values its (filtered) pixel rows hold: a
    page of one colour has a handful, a rendered one nearly all 256."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    pixels, position = b"", 8
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        if data[position + 4 : position + 8] == b"IDAT":
            pixels += data[position + 8 : position + 8 + length]
        position += 12 + length
    return width, height, len(set(zlib.decompress(pixels)))


@NEEDS_CHROMIUM
class TestRenderedInChromium:
    """What a newcomer sees: both pages render the API in a real browser, offline."""

    async def test_swagger_ui_renders_every_route_and_authorize(
        self, live: LiveFactory, tmp_path: Path
    ) -> None:
        async with live() as server:
            dom, screenshot = await render(f"{server.http}/docs", tmp_path)

        assert re.search(r'<button class="btn authorize[^"]*"><span>Authorize</span>', dom)
        blocks = dom.split('class="opblock opblock-')[1:]
        locked = {}
        for block in blocks:
            (path,) = OPBLOCK_PATH.findall(block)
            locked[path] = "authorization__btn" in block
        assert set(REST_PATHS) <= set(locked)
        assert {p for p, lock in locked.items() if lock} == {p for p, _ in PROTECTED + SCOPED}
        width, height, variety = png_size_and_variety(screenshot)
        assert (width, height) == (1280, 2000)
        assert variety > 64, "the screenshot is (nearly) one colour"

    async def test_redoc_renders_every_route(self, live: LiveFactory, tmp_path: Path) -> None:
        async with live() as server:
            dom, screenshot = await render(f"{server.http}/redoc", tmp_path)

        assert "api-content" in dom
        for path, method in REST_PATHS.items():  # each operation's heading: verb, then path
            heading = rf'http-verb {method}">{method}</span><span[^>]*>{re.escape(path)}</span>'
            assert re.search(heading, dom), f"{method.upper()} {path}"
        assert dom.count("Authorizations:") == len(PROTECTED + SCOPED)
        width, height, variety = png_size_and_variety(screenshot)
        assert (width, height) == (1280, 2000)
        assert variety > 64, "the screenshot is (nearly) one colour"
