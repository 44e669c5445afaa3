"""What happens to a watched stream besides its ticks: `watch_events` yields these in order
with the ticks, and `watch` hands them to `on_event` (or logs them): none passes silently."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Connected:
    """Subscribed on a new connection; `resumed` maps each symbol resumed to the last `seq`
    seen before (empty on the first connection)."""

    url: str
    resumed: Mapping[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"connected to {self.url}" + (", resuming" if self.resumed else "")


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The connection ended (`code`: its close code, None when it dropped or never opened);
    the next attempt is in `retry_in` seconds."""

    code: int | None
    reason: str
    retry_in: float

    def __str__(self) -> str:
        why = f"closed {self.code}" if self.code is not None else "connection lost"
        why += f" ({self.reason})" if self.reason else ""
        return f"{why}; reconnecting in {self.retry_in:.1f}s"


@dataclass(frozen=True, slots=True)
class Gap:
    """A `seq` jump from `after` to `before`: the service conflated this slow reader's ticks
    (latest price wins), or a resume went past its retention window. `refilled` of the
    skipped ticks came from `/history` and were yielded before the tick at `before`;
    `missing` could not be had."""

    symbol: str
    after: int
    before: int
    refilled: int
    missing: int

    @property
    def skipped(self) -> int:
        return self.before - self.after - 1

    def __str__(self) -> str:
        text = f"{self.symbol}: seq jumped {self.after} -> {self.before}"
        if self.missing:
            return f"{text}; {self.missing} of {self.skipped} ticks lost"
        return f"{text}; all {self.skipped} refilled from history"


@dataclass(frozen=True, slots=True)
class Reset:
    """The service restarted `symbol`'s sequence, or it lost ticks no one can return (a
    snapshot marked `reset`): the stream goes on from `seq`; what came between is gone."""

    symbol: str
    previous: int | None
    seq: int

    def __str__(self) -> str:
        return f"{self.symbol}: sequence reset from {self.previous} to {self.seq}"


@dataclass(frozen=True, slots=True)
class Dropped:
    """The service stopped serving these symbols (their instruments were disabled); the
    others are watched on, and a reconnect no longer asks for these."""

    symbols: tuple[str, ...]
    message: str

    def __str__(self) -> str:
        return f"{', '.join(self.symbols)} dropped: {self.message}"


StreamEvent = Connected | Disconnected | Gap | Reset | Dropped
