"""Going away: on SIGTERM/SIGINT, close every stream with 1001 before the server starts
tearing connections down (uvicorn's own WebSocket protocols close them with 1012).

The lifespan runs after uvicorn has installed its own signal handlers, so we chain onto them.
Ours starts the 1001 closes on the loop and hands the signal to uvicorn's handler only once
they are sent (or after `HAND_OVER_AFTER` seconds, if a close hangs). Handing over at once
would race: uvicorn polls its exit flag every 0.1 s and, when it wins, sends its 1012 before
our closes run. A second signal while ours are still closing goes to uvicorn at once (a
second Ctrl+C forces the exit). pricefeed's own protocol (`WS_IMPL=fast`) also closes with
1001 when uvicorn gets there first; the other implementations rely on this hand-over.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from app.errors import CloseCode
from app.prices.streams import StreamRegistry

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
HAND_OVER_AFTER = 2.0  # seconds: the longest uvicorn's shutdown waits for our closes


@contextmanager
def close_streams_on_exit_signal(streams: StreamRegistry) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}
    closing: list[asyncio.Task[None]] = []

    def hand_over(chained: Callable[[int, FrameType | None], Any], signum: int) -> None:
        handed = False

        def once(*_: object) -> None:
            nonlocal handed
            if not handed:
                handed = True
                timer.cancel()
                chained(signum, None)

        timer = loop.call_later(HAND_OVER_AFTER, once)
        if not closing:
            closing.append(
                loop.create_task(streams.close_all(CloseCode.GOING_AWAY, "server going away"))
            )
            closing[0].add_done_callback(once)
        else:  # a second signal: uvicorn decides at once (a second SIGINT forces the exit)
            once()

    def handler(signum: int, frame: FrameType | None) -> None:
        chained = previous.get(signum)
        if callable(chained):
            loop.call_soon_threadsafe(hand_over, chained, signum)
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
