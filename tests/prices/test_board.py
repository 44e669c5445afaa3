"""The price board and the JavaScript client it runs on (app/prices/board.py): the module at
/static/pricefeed.js is clients/js/pricefeed.js, served as JavaScript with caching that
cannot serve a stale copy; the board's Content-Security-Policy admits no injected script; and,
in headless Chromium, the board streams through the module, under that policy, and resumes
without a gap after a deploy closes its stream. The page's look: tests/test_docs.py."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import httpx

from app.errors import CloseCode
from tests.chromium import NEEDS_CHROMIUM, open_page
from tests.support import ROOT, LiveApp

ApiFactory = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]
LiveFactory = Callable[..., AbstractAsyncContextManager[LiveApp]]

CLIENT_SOURCE = ROOT / "clients" / "js" / "pricefeed.js"
MODULE_URL = re.compile(r'from "(/static/pricefeed\.js\?v=[0-9a-f]+)"')


def csp_directives(header: str) -> dict[str, list[str]]:
    directives = (d.split() for d in header.split(";") if d.strip())
    return {name: values for name, *values in directives}


class TestClientModule:
    async def test_is_the_client_of_clients_js_served_as_javascript(
        self, client: httpx.AsyncClient
    ) -> None:
        response = await client.get("/static/pricefeed.js")

        assert response.status_code == 200
        assert response.headers["content-type"] == "text/javascript; charset=utf-8"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.content == CLIENT_SOURCE.read_bytes()
        assert "export class PricefeedClient" in response.text

    async def test_the_board_asks_for_this_version_which_may_be_kept_for_good(
        self, client: httpx.AsyncClient
    ) -> None:
        board = await client.get("/")
        (versioned,) = MODULE_URL.findall(board.text)

        pinned = await client.get(versioned)
        plain = await client.get("/static/pricefeed.js")
        old = await client.get("/static/pricefeed.js?v=0123456789")

        assert pinned.content == plain.content
        assert "immutable" in pinned.headers["cache-control"]
        # Without the version (or with another one) a browser asks again every time.
        assert plain.headers["cache-control"] == "no-cache"
        assert old.headers["cache-control"] == "no-cache"
        assert pinned.headers["etag"] == plain.headers["etag"]

    async def test_an_unchanged_copy_is_revalidated_without_a_body(
        self, client: httpx.AsyncClient
    ) -> None:
        first = await client.get("/static/pricefeed.js")
        again = await client.get(
            "/static/pricefeed.js", headers={"If-None-Match": first.headers["etag"]}
        )
        changed = await client.get("/static/pricefeed.js", headers={"If-None-Match": '"other"'})

        assert again.status_code == 304
        assert again.content == b""
        assert changed.status_code == 200

    async def test_a_page_on_an_allowed_origin_may_import_it(self, api: ApiFactory) -> None:
        """Browsers fetch a cross-origin module script with CORS."""
        async with api(allowed_origins=["https://desk.example"]) as client:
            allowed = await client.get(
                "/static/pricefeed.js", headers={"Origin": "https://desk.example"}
            )
            other = await client.get(
                "/static/pricefeed.js", headers={"Origin": "https://elsewhere.example"}
            )

        assert allowed.headers["access-control-allow-origin"] == "https://desk.example"
        assert "access-control-allow-origin" not in other.headers


class TestBoardPolicy:
    async def test_no_script_runs_but_the_pages_own(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/")
        policy = csp_directives(response.headers["content-security-policy"])

        assert policy["default-src"] == ["'none'"]
        assert policy["script-src"][0] == "'self'"
        assert all(v.startswith("'sha256-") for v in policy["script-src"][1:])
        for directive in ("script-src", "style-src"):
            assert "'unsafe-inline'" not in policy[directive]
            assert "'unsafe-eval'" not in policy[directive]
        assert policy["connect-src"] == ["'self'"]
        assert policy["form-action"] == ["'none'"]
        assert policy["frame-ancestors"] == ["'none'"]

    async def test_a_configured_value_cannot_close_its_data_block(self, api: ApiFactory) -> None:
        hostile = "</script><script>alert(1)</script>"
        async with api(demo_client_id=hostile) as client:
            response = await client.get("/")

        assert response.status_code == 200
        assert hostile not in response.text
        assert "\\u003c/script>\\u003cscript>alert(1)\\u003c/script>" in response.text


# In the page, from before its scripts run: the policy violations it reports, and every
# status line it shows. Then its table and footer, read as a user reads them.
WATCH_PAGE = """
window.__violations = [];
window.__states = [];
document.addEventListener('securitypolicyviolation',
  (e) => window.__violations.push(`${e.violatedDirective} ${e.blockedURI}`));
document.addEventListener('DOMContentLoaded', () => {
  const state = document.getElementById('state');
  new MutationObserver(() => window.__states.push(state.textContent))
    .observe(state, { childList: true, characterData: true, subtree: true });
});
"""
STATE = "document.getElementById('state').textContent"
FOOTER = "document.getElementById('stats').textContent"
ROWS = """[...document.querySelectorAll('#rows tr')].map((tr) => ({
  symbol: tr.cells[0].textContent, price: tr.cells[2].textContent,
  seq: Number(tr.cells[6].textContent) }))"""
ALL_PRICED = f"{ROWS}.every((r) => /^\\d+\\.\\d+$/.test(r.price) && r.seq > 0)"


def footer_count(footer: str, label: str) -> int:
    match = re.search(rf"(\d+) {label}|{label} (\d+)", footer)
    assert match, f"{label!r} not in {footer!r}"
    return int(match.group(1) or match.group(2))


@NEEDS_CHROMIUM
class TestBoardInChromium:
    async def test_streams_through_the_module_under_its_policy(
        self, live: LiveFactory, tmp_path: Path
    ) -> None:
        async with live() as server, open_page(server.http, tmp_path, WATCH_PAGE) as page:
            await page.wait_for(f"{STATE}.startsWith('live') && {ALL_PRICED}")
            first = {r["symbol"]: r["seq"] for r in await page.evaluate(ROWS)}
            await page.wait_for(f"{ROWS}.every((r) => r.seq > ({json.dumps(first)})[r.symbol])")
            loaded = await page.evaluate(
                "performance.getEntriesByType('resource').map((e) => e.name)"
            )
            violations = await page.evaluate("window.__violations")
            footer = await page.evaluate(FOOTER)
            exceptions = page.exceptions

        assert any("/static/pricefeed.js?v=" in url for url in loaded)
        assert violations == []
        assert exceptions == []
        assert footer_count(footer, "gaps") == 0
        assert footer_count(footer, "reconnects") == 0

    async def test_resumes_without_a_gap_after_a_deploy_closes_its_stream(
        self, live: LiveFactory, tmp_path: Path
    ) -> None:
        async with live() as server, open_page(server.http, tmp_path, WATCH_PAGE) as page:
            await page.wait_for(f"{STATE}.startsWith('live') && {ALL_PRICED}")
            await server.app.state.streams.close_all(CloseCode.GOING_AWAY, "deploy")
            await page.wait_for("window.__states.some((s) => s.startsWith('reconnecting'))")
            await page.wait_for(f"{STATE}.startsWith('live')")
            before = await page.evaluate(FOOTER)
            await page.wait_for(
                f"Number(/(\\d+) ticks/.exec({FOOTER})[1]) > {footer_count(before, 'ticks')} + 20"
            )
            footer = await page.evaluate(FOOTER)
            states = await page.evaluate("window.__states")
            violations = await page.evaluate("window.__violations")

        reconnecting = [s for s in states if s.startswith("reconnecting")]
        assert len(reconnecting) == 1 and "closed 1001" in reconnecting[0], states
        assert footer_count(footer, "reconnects") == 1
        assert footer_count(footer, "gaps") == 0
        assert violations == []
        assert page.exceptions == []

    async def test_renews_its_token_on_the_same_connection(
        self, live: LiveFactory, tmp_path: Path
    ) -> None:
        """The board's getToken signs in again with the same credentials; the client sends the
        new token in-band, so the stream outlives the first token (30 s, the shortest TTL)."""
        sign_ins = (
            "performance.getEntriesByType('resource')"
            ".filter((e) => e.name.endsWith('/v1/auth/token')).length"
        )
        async with (
            live(jwt_ttl_seconds=30) as server,
            open_page(server.http, tmp_path, WATCH_PAGE) as page,
        ):
            await page.wait_for(f"{STATE}.startsWith('live') && {ALL_PRICED}")
            await page.wait_for(f"{sign_ins} >= 2", timeout=40)
            # Past the first token's expiry (page time counts from the navigation)
            await page.wait_for("performance.now() > 33000", timeout=40)
            ticks = footer_count(await page.evaluate(FOOTER), "ticks")
            await page.wait_for(f"Number(/(\\d+) ticks/.exec({FOOTER})[1]) > {ticks} + 20")
            footer = await page.evaluate(FOOTER)
            states = await page.evaluate("window.__states")

        assert footer_count(footer, "reconnects") == 0
        assert not [s for s in states if s.startswith(("reconnecting", "error"))], states
        assert page.exceptions == []
