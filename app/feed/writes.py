"""A term's batch writes: each names the one stamped before it, so the store refuses a write
that follows one that never reached Redis (app/prices/store.py's `Chain`), and on Redis each
publishes its own ticks in the same script, through the broker (`Broker.publish_written`):
one command and one answer a batch, and a batch is never published without its write, nor
behind a gap. Elsewhere (`memory://`, or a store whose writes have no set order) a batch is
written here and published by the producer after it.

A batch whose producer stops waiting for it (`abandon`) is cancelled, so that if it was not
sent it never is; but when the producer stops (cancelled: its term ends, the process stops)
and keeps history, Redis may already be publishing it, so it is seen through instead and, if
written, offered to history (`settled` waits for those). Sending one late is safe: the
lease's fence and the chain refuse it wherever it may not go."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable
from typing import Any

from app.broker import Broker, price_channel
from app.history.writer import HistoryWriter
from app.outcomes import consume
from app.prices.store import Chain, Run, TickStore

SETTLE_SECONDS = 1.0


class BatchWrites:
    def __init__(
        self, store: TickStore, broker: Broker, history: HistoryWriter | None = None
    ) -> None:
        self._store = store
        self._broker = broker
        self._history = history
        self._term = ""
        self._count = 0
        self._last: str | None = None
        self._unsettled: set[asyncio.Future[Any]] = set()  # abandoned, seen through

    @property
    def publish(self) -> bool:
        """Whether a write publishes its own ticks (the store and the broker on one Redis,
        the store's writes in call order)."""
        return self._broker.publishes_written and self._store.ordered_writes

    def new_term(self) -> None:
        """A fresh chain: the term's first write follows nothing."""
        self._term, self._count, self._last = secrets.token_hex(4), 0, None

    def send(self, runs: list[Run], *, fence: str | None) -> Awaitable[list[int]]:
        """The store write of a batch's runs, next in this term's chain (and, if `publish`,
        their publish): per run, how many of its first ticks were not new."""
        self._count += 1
        chain = Chain(f"{self._term}:{self._count}", self._last)
        self._last = chain.name
        write = self._store.scripted_write(runs, fence=fence, chain=chain)
        if write is None or not self.publish:
            return self._store.append_runs(runs, fence=fence, chain=chain)
        messages = [(price_channel(run.symbol), [tick.frame for tick in run.ticks]) for run in runs]
        return self._store.written(self._broker.publish_written(write, messages))

    def abandon(self, written: asyncio.Future[Any], runs: list[Run], *, stopping: bool) -> None:
        """The producer stops waiting for `written`, the write of `runs` (`stopping`: it was
        cancelled, rather than failed)."""
        history = self._history
        if not stopping or history is None:
            written.add_done_callback(consume)
            written.cancel()  # if it was not sent yet, it never is
            return
        self._unsettled.add(written)

        def settled(future: asyncio.Future[Any]) -> None:
            self._unsettled.discard(future)
            if not future.cancelled() and future.exception() is None:
                history.offer(runs)  # published by Redis, whatever became of its producer

        written.add_done_callback(settled)

    async def settled(self) -> None:
        """Once every abandoned write seen through has its outcome, or SETTLE_SECONDS have
        passed (Redis answers a write in a millisecond; one that is away must not use up the
        stop's time, which the last flush to history needs): history holds what they wrote."""
        if self._unsettled:
            await asyncio.wait(set(self._unsettled), timeout=SETTLE_SECONDS)
