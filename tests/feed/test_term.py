"""app/feed/term.py: a term whose task does not end when cancelled is ended all the same,
and says which task held it."""

from __future__ import annotations

import asyncio
import logging

import pytest

from app.feed.term import Term


class LeaseLost(Exception):
    pass


async def _lose_lease() -> None:
    await asyncio.sleep(0.01)
    raise LeaseLost


async def _swallows_one_cancel() -> None:
    # what a lost cancel looks like from outside: the first one has no effect
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        pass
    await asyncio.sleep(3600)


async def _swallows_every_cancel(released: asyncio.Event) -> None:
    while not released.is_set():
        try:
            await released.wait()
        except asyncio.CancelledError:
            pass


async def test_a_task_that_lost_its_cancel_is_named_and_cancelled_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="app.feed.term")
    with pytest.raises(ExceptionGroup) as ended:
        async with Term(grace=0.05, give_up=pytest.fail) as term:
            term.create_task(_lose_lease(), name="producer-lease")
            term.create_task(_swallows_one_cancel(), name="producer-inbox")
    assert ended.group_contains(LeaseLost)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith("producer: task producer-inbox did not end")
    assert "_swallows_one_cancel" in said[0]


async def test_a_task_that_never_ends_ends_the_process(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="app.feed.term")
    gave_up, released = asyncio.Event(), asyncio.Event()

    async def run() -> None:
        async with Term(grace=0.05, attempts=2, give_up=gave_up.set) as term:
            term.create_task(_lose_lease(), name="producer-lease")
            term.create_task(_swallows_every_cancel(released), name="producer-inbox")

    runner = asyncio.create_task(run())
    await gave_up.wait()
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 3 and "still running after 3 cancels; exiting" in said[-1]
    released.set()  # the real give_up exits the process; here the task lets go
    with pytest.raises(ExceptionGroup):
        await runner


async def test_a_term_that_ends_cleanly_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="app.feed.term")
    with pytest.raises(ExceptionGroup):
        async with Term(grace=0.05, give_up=pytest.fail) as term:
            term.create_task(_lose_lease(), name="producer-lease")
            term.create_task(asyncio.sleep(3600), name="producer-stats")
    await asyncio.sleep(0.2)  # past the grace: the watchdog is gone, not merely late
    assert caplog.records == []
