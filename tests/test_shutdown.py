"""The exit-signal hook (app/shutdown.py): streams get their 1001 before uvicorn hears of the
signal, since uvicorn's own protocols would close them with 1012 once it does."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from types import FrameType

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
