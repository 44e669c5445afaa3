"""What the SDK's tests share: token providers made of the tests' own tokens, and watching
until a condition holds."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pricefeed_client import AccessToken, Gap, Reset, StreamEvent, Tick

from tests.support import token


@dataclass
class Tokens:
    """A token provider that mints tokens of `ttl` seconds for `symbols`, and counts them.
    `lie_first`: the first token claims to last an hour (a clock that is wrong), so only the
    service's 4408 tells the client it expired."""

    ttl: int = 300
    symbols: list[str] = field(default_factory=lambda: ["*"])
    lie_first: bool = False
    issued: int = 0

    async def __call__(self) -> AccessToken:
        self.issued += 1
        value = token(subject="sdk", symbols=self.symbols, ttl=self.ttl)
        if self.lie_first and self.issued == 1:
            return AccessToken(value, time.time() + 3600)
        return AccessToken(value, expires_at(value))


def expires_at(jwt: str) -> float:
    """The token's own `exp` (whole seconds: up to 1 s sooner than issue time + ttl)."""
    payload = jwt.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return float(claims["exp"])


@dataclass
class Seen:
    """Everything a watch yielded, in order."""

    items: list[Tick | StreamEvent] = field(default_factory=list)

    def add(self, item: Tick | StreamEvent) -> None:
        self.items.append(item)

    def ticks(self, symbol: str | None = None) -> list[Tick]:
        return [
            i for i in self.items if isinstance(i, Tick) and (symbol is None or i.symbol == symbol)
        ]

    def events(self, kind: type | tuple[type, ...] = object) -> list[StreamEvent]:
        return [i for i in self.items if not isinstance(i, Tick) and isinstance(i, kind)]

    def count(self, test: Callable[[Tick | StreamEvent], bool]) -> int:
        return sum(1 for i in self.items if test(i))


def unexplained_jumps(seen: Seen) -> list[tuple[str, int, int]]:
    """Each (symbol, from, to) where the ticks handed on skip or go back with no Gap or
    Reset event saying so just before: what a user would never be told."""
    last: dict[str, int] = {}
    explained: set[tuple[str, int, int]] = set()
    found = []
    for item in seen.items:
        if isinstance(item, Gap):
            explained.add((item.symbol, item.after, item.before))
        elif isinstance(item, Reset) and item.previous is not None:
            explained.add((item.symbol, item.previous, item.seq))
        elif isinstance(item, Tick):
            prev = last.get(item.symbol)
            if prev is not None and item.seq != prev + 1:
                jump = (item.symbol, prev, item.seq)
                gap_filled = any(
                    s == item.symbol and a <= prev and item.seq < b for s, a, b in explained
                )
                if jump not in explained and not gap_filled:
                    found.append(jump)
            last[item.symbol] = item.seq
    return found
