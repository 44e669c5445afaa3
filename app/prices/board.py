"""The live price board: one page at `/`, streaming over the multiplexed WebSocket."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import orjson
from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from app.config import DEV_DEMO_CLIENT_SECRET
from app.deps import StateDep

router = APIRouter(include_in_schema=False)

_PAGE = Path(__file__).with_name("static") / "board.html"


@lru_cache(maxsize=1)
def _template() -> str:
    return _PAGE.read_text(encoding="utf-8")


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
    page = _template().replace("/*PRICEFEED_CONFIG*/{}", orjson.dumps(config).decode())
    return HTMLResponse(page, headers={"Cache-Control": "no-store"})
