"""The exit-signal hook (app/shutdown.py): streams get their GOING_AWAY (1001) before uvicorn
hears of the signal, since uvicorn's own protocols would close them with 1012 once it does."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pytest

from app import shutdown
from app.errors import CloseCode
from app.prices.streams import StreamRegistry


class SlowToClose:
    """A stream whose close takes as long as the test says."""

    def __init__(self) -> None:
        self.closed_with: int | None = None
        self.may_finish = asyncio.Event()

    async def close(self, code: int, reason: str) -> None:
        self.closed_with = code
        await self.may_finish.wait()


@pytest.fixture
def uvicorn_handler() -> Iterator[list[int]]:
    """Stands in for uvicorn's SIGTERM/SIGINT handler: records the signals it is handed."""
    handed: list[int] = []

    def handle_exit(signum: int, frame: FrameType | None) -> None:
        handed.append(signum)

    before = {sig: signal.signal(sig, handle_exit) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield handed
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def registry_with(stream: SlowToClose) -> StreamRegistry:
    streams = StreamRegistry(max_total=10, max_per_subject=10)
    streams._open.add(stream)
    return streams


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0.01)


async def test_uvicorn_hears_of_the_signal_only_once_the_closes_are_sent(
    uvicorn_handler: list[int],
) -> None:
    stream = SlowToClose()
    with shutdown.close_streams_on_exit_signal(registry_with(stream)):
        signal.raise_signal(signal.SIGTERM)
        await settle()
        assert stream.closed_with == CloseCode.GOING_AWAY
        assert uvicorn_handler == [], "uvicorn would close the streams with 1012 now"
        stream.may_finish.set()
        await settle()
        assert uvicorn_handler == [signal.SIGTERM]


async def test_a_close_that_hangs_delays_the_exit_only_so_long(
    uvicorn_handler: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutdown, "HAND_OVER_AFTER", 0.05)
    stream = SlowToClose()  # never allowed to finish
    with shutdown.close_streams_on_exit_signal(registry_with(stream)):
        signal.raise_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        assert uvicorn_handler == [signal.SIGTERM]
        stream.may_finish.set()
        await settle()
        assert uvicorn_handler == [signal.SIGTERM], "handed over once, not again"


async def test_a_second_signal_goes_to_uvicorn_at_once(uvicorn_handler: list[int]) -> None:
    stream = SlowToClose()
    with shutdown.close_streams_on_exit_signal(registry_with(stream)):
        signal.raise_signal(signal.SIGINT)
        await settle()
        signal.raise_signal(signal.SIGINT)  # Ctrl+C again: uvicorn forces the exit
        await settle()
        assert uvicorn_handler == [signal.SIGINT]
        stream.may_finish.set()
        await settle()
        assert uvicorn_handler == [signal.SIGINT, signal.SIGINT]


async def test_the_handlers_are_put_back(uvicorn_handler: list[int]) -> None:
    ours = signal.getsignal(signal.SIGTERM)
    with shutdown.close_streams_on_exit_signal(registry_with(SlowToClose())):
        assert signal.getsignal(signal.SIGTERM) is not ours
    assert signal.getsignal(signal.SIGTERM) is ours


async def test_a_task_that_will_not_stop_cannot_hold_shutdown_forever(
    build_app: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An orchestrator kills a process that lingers: each shutdown step is bounded, and the
    one that hung is named."""
    app = build_app()
    released = asyncio.Event()

    async def stubborn() -> None:
        while not released.is_set():
            try:
                await released.wait()
            except asyncio.CancelledError:
                continue  # refuses every cancellation until released

    async with app.router.lifespan_context(app) as state:
        state["app"].supervisor.spawn("stubborn", stubborn)
        await asyncio.sleep(0)
        closing = asyncio.get_running_loop().time()
    took = asyncio.get_running_loop().time() - closing
    released.set()  # let the test's loop end

    assert took < 15, "shutdown went on without the stubborn task"
    logged = [r.getMessage() for r in caplog.records]
    assert any("task stubborn did not stop when cancelled" in m for m in logged)
    assert "shutdown: stopping background tasks took over 3 s; going on without it" in logged
