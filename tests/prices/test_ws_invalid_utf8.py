"""A text frame that is not UTF-8 closes the connection with 1007 (CloseCode.INVALID_DATA) and
costs the log one DEBUG line: no ERROR with a traceback that any client could repeat."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager

import pytest

from app.errors import CloseCode
from tests.support import SERVER_VARIANTS, LiveApp, open_stream, token

LiveFactory = Callable[..., AbstractAsyncContextManager[LiveApp]]

pytestmark = SERVER_VARIANTS


@contextlib.contextmanager
def watching_uvicorn(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """What uvicorn logs too: its loggers do not propagate to the root one caplog watches, and
    the server's start replaces their handlers, so this goes on once the server runs."""
    uvicorn = logging.getLogger("uvicorn.error")
    uvicorn.addHandler(caplog.handler)
    try:
        yield
    finally:
        uvicorn.removeHandler(caplog.handler)


@pytest.mark.parametrize("route", ["/v1/ws", "/v1/ws/prices/AAPL"])
async def test_invalid_utf8_closes_1007_with_one_debug_line(
    live: LiveFactory, caplog: pytest.LogCaptureFixture, route: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="app.prices.ws")
    async with live(producer="off") as server:
        with watching_uvicorn(caplog):
            for _ in range(3):
                async with open_stream(f"{server.ws}{route}?token={token()}") as stream:
                    await stream.conn.send(b'{"op": "ping"\xff}', text=True)
                    code, _ = await stream.closed_with()
                assert code == CloseCode.INVALID_DATA

    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    lines = [r for r in caplog.records if "1007" in r.getMessage()]
    assert len(lines) == 3, "one line per connection"
    assert all(r.levelno == logging.DEBUG and r.exc_info is None for r in lines)
