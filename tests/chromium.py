"""Headless Chromium for the browser tests: the flags that work here (and in CI), and a small
DevTools-protocol client to drive a page while it runs (tests/prices/test_board.py).

Debian's `chromium` package gives /usr/bin/chromium; without it the browser tests skip and
say so. Every host name but 127.0.0.1 fails to resolve: what a page shows came from the app."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect

CHROMIUM = Path("/usr/bin/chromium")
NEEDS_CHROMIUM = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs /usr/bin/chromium (Debian: apt-get install chromium); "
    "the machine `make test` runs on in CI has it",
)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
_LISTENING = re.compile(rb"DevTools listening on (ws://\S+)")


class Page:
    """One tab, driven over the DevTools protocol: evaluate script in it, wait for a condition,
    and the exceptions its scripts threw (none, in a page that works)."""

    def __init__(self, conn: ClientConnection, session: str) -> None:
        self._conn = conn
        self._session = session
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.exceptions: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self._conn:
            message = orjson.loads(raw)
            future = self._waiting.pop(message.get("id", -1), None)
            if future is not None and not future.done():
                future.set_result(message)
            elif message.get("method") == "Runtime.exceptionThrown":
                details = message["params"]["exceptionDetails"]
                self.exceptions.append(
                    details.get("exception", {}).get("description") or details.get("text", "")
                )

    async def send(self, method: str, session: bool = True, **params: Any) -> dict[str, Any]:
        ident = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = future
        message: dict[str, Any] = {"id": ident, "method": method, "params": params}
        if session:
            message["sessionId"] = self._session
        await self._conn.send(orjson.dumps(message).decode())
        answer = await asyncio.wait_for(future, 30)
        assert "error" not in answer, f"{method}: {answer['error']}"
        result: dict[str, Any] = answer["result"]
        return result

    async def evaluate(self, expression: str) -> Any:
        answer = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        assert "exceptionDetails" not in answer, answer["exceptionDetails"]
        return answer["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        """The value of `expression` once it is truthy (polled)."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"never true: {expression}")
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@contextlib.asynccontextmanager
async def open_page(url: str, directory: Path, before_load: str = "") -> AsyncIterator[Page]:
    """Chromium with `url` open in one tab; `before_load` runs in the page ahead of its own
    scripts (and, as DevTools runs it, outside the page's Content-Security-Policy)."""
    process = await asyncio.create_subprocess_exec(
        str(CHROMIUM),
        *FLAGS,
        f"--user-data-dir={directory / 'profile'}",
        "--remote-debugging-port=0",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        endpoint = None
        async with asyncio.timeout(30):
            while endpoint is None:
                line = await process.stderr.readline()
                assert line, "chromium exited before it listened for DevTools"
                if found := _LISTENING.search(line):
                    endpoint = found.group(1).decode()
        # Chromium keeps writing to stderr: keep reading, or it blocks on a full pipe.
        drain = asyncio.create_task(process.stderr.read())
        async with connect(endpoint, max_size=None) as conn:
            first = Page(conn, session="")
            target = await first.send("Target.createTarget", session=False, url="about:blank")
            attached = await first.send(
                "Target.attachToTarget", session=False, targetId=target["targetId"], flatten=True
            )
            await first.close()
            page = Page(conn, attached["sessionId"])
            try:
                await page.send("Runtime.enable")
                await page.send("Page.enable")
                if before_load:
                    await page.send("Page.addScriptToEvaluateOnNewDocument", source=before_load)
                await page.send("Page.navigate", url=url)
                await page.wait_for(
                    "location.href !== 'about:blank' && document.readyState === 'complete'"
                )
                yield page
            finally:
                await page.close()
        drain.cancel()
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
