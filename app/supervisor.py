"""Background tasks that must not die silently: each is restarted with backoff, every
failure is logged and counted, and a task that failed recently makes /readyz answer 503."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from app import metrics

logger = logging.getLogger(__name__)

_UNHEALTHY_FOR_SECONDS = 30.0


class Supervisor:
    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._failed_at: dict[str, tuple[float, str]] = {}

    def spawn(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        self._tasks[name] = asyncio.create_task(self._keep_running(name, factory), name=name)

    async def _keep_running(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        backoff = 0.5
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
            if time.monotonic() - started > 60:
                backoff = 0.5
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    def unhealthy(self) -> dict[str, str]:
        """Tasks that failed within the last 30 seconds, with why."""
        now = time.monotonic()
        return {
            name: reason
            for name, (when, reason) in self._failed_at.items()
            if now - when < _UNHEALTHY_FOR_SECONDS
        }

    async def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()
