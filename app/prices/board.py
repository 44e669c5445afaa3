"""The live price board: one page at `/`, and the JavaScript client it runs on,
`/static/pricefeed.js` (clients/js/pricefeed.js: the board's behaviour is that module's).

The module is one file in the repository, clients/js/pricefeed.js; app/prices/static/pricefeed.js
is a link to it, which the wheel (and so the image) carries as a file.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse

from app.config import DEV_DEMO_CLIENT_SECRET
from app.deps import StateDep

router = APIRouter(include_in_schema=False)

_STATIC = Path(__file__).with_name("static")
CLIENT_URL = "/static/pricefeed.js"
_CONFIG_MARK = "/*PRICEFEED_CONFIG*/{}"
_CLIENT_MARK = "/*PRICEFEED_CLIENT_URL*/"
# What runs inline: the page's module script and its style (not its JSON data block).
_INLINE = re.compile(r'<(script|style)(?: type="module")?>(.*?)</\1>', re.DOTALL)
# The page asks for the client by its content hash, so a browser may keep that copy for good;
# the same URL without it (or with an old hash) is revalidated on every use.
_IMMUTABLE = "public, max-age=31536000, immutable"
_REVALIDATE = "no-cache"


@dataclass(frozen=True)
class ClientModule:
    body: bytes
    etag: str  # quoted, as the header carries it

    @property
    def version(self) -> str:
        return self.etag.strip('"')


@dataclass(frozen=True)
class BoardPage:
    html: str
    csp: str


@lru_cache(maxsize=1)
def client_module() -> ClientModule:
    body = (_STATIC / "pricefeed.js").read_bytes()
    return ClientModule(body=body, etag=f'"{hashlib.sha256(body).hexdigest()[:20]}"')


def _sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


@lru_cache(maxsize=1)
def board_page() -> BoardPage:
    """The page with the client's versioned URL in, and a CSP that admits its own inline
    script and style (by hash) and nothing else inline: no injected script can run."""
    html = (_STATIC / "board.html").read_text(encoding="utf-8")
    html = html.replace(_CLIENT_MARK, f"{CLIENT_URL}?v={client_module().version}")
    hashes: dict[str, list[str]] = {"script": [], "style": []}
    for tag, body in _INLINE.findall(html):
        hashes[tag].append(_sha256_source(body))
    csp = "; ".join(
        [
            "default-src 'none'",
            " ".join(["script-src 'self'", *hashes["script"]]),
            " ".join(["style-src", *hashes["style"]]),
            "connect-src 'self'",  # fetch and the WebSocket, same origin (CSP 3: ws/wss too)
            "img-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",  # the sign-in form is the script's; never a GET with the secret
            "frame-ancestors 'none'",
        ]
    )
    return BoardPage(html=html, csp=csp)


@router.get("/", response_class=HTMLResponse)
async def show_price_board(state: StateDep) -> HTMLResponse:
    """The live price board."""
    settings = state.settings
    # In dev the page offers the demo client, so `make run` then a browser just works.
    # Its secret is only put in the page while it is the public dev default.
    dev = settings.env == "dev"
    config = {
        "demoClientId": settings.demo_client_id if dev else "",
        "demoClientSecret": settings.demo_client_secret
        if dev and settings.demo_client_secret == DEV_DEMO_CLIENT_SECRET
        else "",
    }
    # A JSON data block, never run: `<` escaped so no value can close it.
    data = orjson.dumps(config).decode().replace("<", "\\u003c")
    page = board_page()
    return HTMLResponse(
        page.html.replace(_CONFIG_MARK, data),
        headers={
            "Cache-Control": "no-store",
            "Content-Security-Policy": page.csp,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


@router.get(CLIENT_URL)
async def serve_client_module(request: Request) -> Response:
    """The JavaScript client, as an ES module."""
    module = client_module()
    versioned = request.query_params.get("v") == module.version
    headers = {
        "ETag": module.etag,
        "Cache-Control": _IMMUTABLE if versioned else _REVALIDATE,
        "X-Content-Type-Options": "nosniff",
    }
    if module.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(module.body, media_type="text/javascript; charset=utf-8", headers=headers)
