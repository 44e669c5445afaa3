"""Background tasks that must not die silently: each is restarted with backoff, every
failure is logged and counted, and a task that failed recently makes /readyz answer 503.

A task's restarts wait 0.5 s doubling to 10 s, jittered (app/backoff.py); one that ran for a
minute before failing starts over from 0.5 s, so a task that fails once a day does not wait
the cap."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from app import metrics
from app.backoff import Backoff

logger = logging.getLogger(__name__)

_UNHEALTHY_FOR_SECONDS = 30.0
_RECANCEL_SECONDS = 1.0


def restart_backoff() -> Backoff:
    """The default: 0.5 s doubling to 10 s, jittered; a run of a minute starts over."""
    return Backoff(base=0.5, cap=10.0, healthy_after=60.0)


class Supervisor:
    def __init__(self, *, backoff: Callable[[], Backoff] = restart_backoff) -> None:
        """`backoff` makes each task's restart delays (tests shorten them)."""
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._failed_at: dict[str, tuple[float, str]] = {}
        self._new_backoff = backoff

    def spawn(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        self._tasks[name] = asyncio.create_task(self._keep_running(name, factory), name=name)

    async def _keep_running(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        backoff = self._new_backoff()
        while True:
            started = time.monotonic()
            try:
                await factory()
                reason = "returned"
                logger.error("task %s returned; restarting it", name)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
                logger.exception("task %s failed; restarting it", name)
            metrics.TASK_FAILURES.labels(task=name).inc()
            self._failed_at[name] = (time.monotonic(), reason)
            await backoff.sleep(ran_for=time.monotonic() - started)

    def unhealthy(self) -> dict[str, str]:
        """Tasks that failed within the last 30 seconds, with why."""
        now = time.monotonic()
        return {
            name: reason
            for name, (when, reason) in self._failed_at.items()
            if now - when < _UNHEALTHY_FOR_SECONDS
        }

    async def stop(self) -> None:
        """Cancel every task and wait for it to end. A task that swallowed its cancellation
        is cancelled again until it ends: on Python 3.11 a TaskGroup that is failing when the
        cancellation comes can lose it (the producer's leadership term is one), and shutdown
        must not wait on that forever."""
        pending = set(self._tasks.values())
        while pending:
            for task in pending:
                task.cancel()
            _done, pending = await asyncio.wait(pending, timeout=_RECANCEL_SECONDS)
            for task in pending:
                where = task.get_stack(limit=1)
                logger.warning(
                    "task %s did not stop when cancelled (at %s); cancelling it again",
                    task.get_name(),
                    f"{where[-1].f_code.co_filename}:{where[-1].f_lineno}" if where else "?",
                )
        self._tasks.clear()
