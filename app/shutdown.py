"""Going away: on SIGTERM/SIGINT, close every stream with 1001 before the server starts
tearing connections down (uvicorn would close them with 1012 after it stopped listening).

The lifespan runs after uvicorn has installed its own signal handlers, so we chain onto them:
ours starts the 1001 closes on the loop, then hands over to uvicorn's.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from app.prices.streams import CLOSE_GOING_AWAY, StreamRegistry

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def close_streams_on_exit_signal(streams: StreamRegistry) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}
    closing: list[asyncio.Task[None]] = []

    def start_closing() -> None:
        if not closing:
            closing.append(
                loop.create_task(streams.close_all(CLOSE_GOING_AWAY, "server going away"))
            )

    def handler(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(start_closing)
        chained = previous.get(signum)
        if callable(chained):
            chained(signum, frame)
        elif chained == signal.SIG_DFL:
            signal.default_int_handler(signum, frame)

    try:
        for sig in _SIGNALS:
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, handler)
    except ValueError:  # not the main thread (an embedding server): nothing to chain onto
        previous.clear()
    try:
        yield
    finally:
        for signum, chained in previous.items():
            signal.signal(signum, chained)
