"""A term's batch writes: each names the one stamped before it, so the store refuses a write
that follows one that never reached Redis (app/prices/store.py's `Chain`), and on Redis each
publishes its own ticks in the same script, through the broker (`Broker.publish_written`):
one command and one answer a batch, and a batch is never published without its write, nor
behind a gap. Elsewhere (`memory://`, or a store whose writes have no set order) a batch is
written here and published by the producer after it."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable

from app.broker import Broker, price_channel
from app.prices.store import Chain, Run, TickStore


class BatchWrites:
    def __init__(self, store: TickStore, broker: Broker) -> None:
        self._store = store
        self._broker = broker
        self._term = ""
        self._count = 0
        self._last: str | None = None

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
