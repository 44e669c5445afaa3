"""The fan-out server broadcaster's README shows, as a baseline for the benchmark.

Run: ``BROADCAST_URL=redis://127.0.0.1:6379/0 uvicorn bench.peers.broadcaster_readme:app``

It is the README's ``chatroom_ws`` / ``chatroom_ws_sender`` pattern, on FastAPI (what pricefeed
is built on; the README's plain Starlette routes behave the same), with a channel per
symbol (``prices:{SYMBOL}``, the channel the bench publisher writes to) and nothing added:
each WebSocket gets its own ``broadcast.subscribe()`` queue (unbounded) and the sender
awaits ``send_text`` for every event.

Deviations from the README, each the smallest that makes it run here:

* ``/ws/{symbols}`` takes a comma-separated list; with one symbol (the bench default) it is
  exactly the README's sender, with more it runs one README sender per symbol.
* Starlette 1.x removed ``on_startup``/``on_shutdown``, so connect/disconnect move into a
  lifespan.
* broadcaster 0.3.1's ``RedisBackend.subscribe`` sets ``_ready`` *before* it awaits
  ``SUBSCRIBE``; its listener task then calls ``pubsub.listen()``, which in redis-py 8.x returns
  at once while no channel is subscribed yet, clears ``_ready`` and waits forever: no message is
  ever delivered. ``_OrderedRedisBackend`` only swaps the two lines (subscribe, then set ready).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from broadcaster import Broadcast
from broadcaster._backends.redis import RedisBackend
from fastapi import FastAPI, WebSocket
from fastapi.responses import PlainTextResponse


class _OrderedRedisBackend(RedisBackend):
    """RedisBackend with SUBSCRIBE awaited before the listener is released (see module doc)."""

    async def subscribe(self, channel: str) -> None:
        await self._pubsub.subscribe(channel)
        self._ready.set()


BROADCAST_URL = os.environ.get("BROADCAST_URL", "redis://127.0.0.1:6379/0")
broadcast = Broadcast(backend=_OrderedRedisBackend(BROADCAST_URL))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await broadcast.connect()
    try:
        yield
    finally:
        await broadcast.disconnect()


app = FastAPI(lifespan=lifespan)


@app.get("/", response_class=PlainTextResponse)
async def homepage() -> str:  # the bench's health check
    return "ok"


@app.websocket("/ws/{symbols}")
async def prices_ws(websocket: WebSocket, symbols: str) -> None:
    await websocket.accept()
    channels = [s for s in symbols.upper().split(",") if s]

    async with anyio.create_task_group() as task_group:
        # run until first is complete
        async def run_prices_ws_receiver() -> None:
            await prices_ws_receiver(websocket=websocket)
            task_group.cancel_scope.cancel()

        task_group.start_soon(run_prices_ws_receiver)
        for symbol in channels[1:]:
            task_group.start_soon(prices_ws_sender, websocket, symbol)
        await prices_ws_sender(websocket, channels[0])


async def prices_ws_receiver(websocket: WebSocket) -> None:
    async for _message in websocket.iter_text():
        pass


async def prices_ws_sender(websocket: WebSocket, symbol: str) -> None:
    async with broadcast.subscribe(channel=f"prices:{symbol}") as subscriber:
        async for event in subscriber:
            await websocket.send_text(event.message)
