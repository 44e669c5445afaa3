"""Lighter stand-ins for two asyncio primitives, for what lives once per connection for hours
(app/server/protocol.py): pure asyncio, no uvicorn or websockets internals."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class LeanQueue:
    """The protocol's queue of ASGI receive events: one consumer, a message or two at a time
    (uvicorn pauses reading while one waits). asyncio.Queue costs ~2.3 KB per connection.

    A consumer that is not waiting may leave `on_put` instead: called (once, then cleared)
    when the next item arrives, so that it need not keep a task waiting in `get` meanwhile."""

    __slots__ = ("_items", "_waiter", "on_put")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None
        self.on_put: Callable[[], None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        elif self.on_put is not None:
            on_put, self.on_put = self.on_put, None
            on_put()

    def empty(self) -> bool:
        return not self._items

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)


class LeanEvent:
    """asyncio.Event without its deque of waiters until someone waits (~0.7 KB saved)."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        if self._waiters:
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._waiters = None

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        if self._set:
            return
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        await waiter
