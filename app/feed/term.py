"""A producer term's tasks, and a bound on how long the term takes to end.

A term is a TaskGroup: when one of its tasks fails (the lease is lost, Redis is gone) or the
term itself is cancelled, every task is cancelled and the term ends once all have. A task
that does not end then would hold the term open for ever, and with it a producer that no
longer leads and never stands by to lead again. That happened: on Python 3.11 a cancel that
lands as an `asyncio.wait_for` completes is lost (app/redis_client.py), and the inbox reader
went on reading.

So a watchdog outside the group: a task still running `grace` seconds after the term began
to end is named in an error log, with where it is, and cancelled again (a lost cancel is a
matter of one event-loop turn; the next one lands). A task that survives `attempts` of
those is not going to end: the process exits (`python -m app` starts the producer again),
since a producer stuck there helps nobody.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any

logger = logging.getLogger(__name__)

GRACE_SECONDS = 10.0  # far longer than any task's teardown (a Redis call is bounded by 5 s)
ATTEMPTS = 3
EXIT_CODE = 70  # EX_SOFTWARE


def _exit_process() -> None:
    logging.shutdown()
    os._exit(EXIT_CODE)  # not SystemExit: the stuck task may be the one that would see it


class Term:
    """`async with Term() as term: term.create_task(...)`: a TaskGroup whose end is bounded."""

    def __init__(
        self,
        *,
        grace: float = GRACE_SECONDS,
        attempts: int = ATTEMPTS,
        give_up: Callable[[], None] = _exit_process,
    ) -> None:
        self._group = asyncio.TaskGroup()
        self._grace = grace
        self._attempts = attempts
        self._give_up = give_up
        self._tasks: list[asyncio.Task[Any]] = []
        self._failed = False
        self._watchdog: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Term:
        await self._group.__aenter__()
        owner = asyncio.current_task()
        assert owner is not None
        self._watchdog = asyncio.create_task(self._watch(owner), name="producer-term-watchdog")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._failed = True
        try:
            await self._group.__aexit__(exc_type, exc, tb)
        finally:
            assert self._watchdog is not None
            self._watchdog.cancel()

    def create_task(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        task = self._group.create_task(coro, name=name)
        task.add_done_callback(self._on_done)
        self._tasks.append(task)
        return task

    def _on_done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or task.exception() is not None:
            self._failed = True  # the group cancels the others

    async def _watch(self, owner: asyncio.Task[Any]) -> None:
        ending_since: float | None = None
        attempts = 0
        while True:
            await asyncio.sleep(self._grace / 4)
            if ending_since is None:
                if self._failed or owner.cancelling():
                    ending_since = time.monotonic()
                continue
            if time.monotonic() - ending_since < self._grace * (attempts + 1):
                continue
            stuck = [task for task in self._tasks if not task.done()]
            if not stuck:
                return
            if attempts == self._attempts:
                logger.critical(
                    "producer: term cannot end, %s still running after %d cancels; exiting",
                    ", ".join(task.get_name() for task in stuck),
                    attempts + 1,
                )
                self._give_up()
                return
            attempts += 1
            for task in stuck:
                where = " > ".join(
                    f"{frame.f_code.co_name} ({frame.f_code.co_filename}:{frame.f_lineno})"
                    for frame in task.get_stack()[-3:]  # the innermost: what it awaits
                )
                logger.error(
                    "producer: task %s did not end %.1f s after its term did (at %s); "
                    "cancelling it again",
                    task.get_name(),
                    time.monotonic() - ending_since,
                    where,
                )
                task.cancel()
