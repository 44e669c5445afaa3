"""The live table of `python -m pricefeed_client watch` (needs `rich`: the `cli` extra): a row
per symbol, and a status line that says whether the stream is live, reconnecting, or has
lost ticks."""

from __future__ import annotations

import time
from collections.abc import Sequence
from decimal import Decimal
from types import TracebackType

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pricefeed_client.events import Connected, Disconnected, Dropped, Gap, Reset, StreamEvent
from pricefeed_client.models import Tick

REDRAW_SECONDS = 0.1  # at most this often for ticks; a change of state draws at once


class LiveBoard:
    def __init__(self, symbols: Sequence[str], url: str, console: Console | None = None) -> None:
        self.symbols = [s.strip().upper() for s in symbols]
        self.url = url
        self.rows: dict[str, Tick] = {}
        self.first: dict[str, Decimal] = {}
        self.state, self.style = f"connecting to {url}", "yellow"
        self.note = ""
        self.gaps = self.lost = self.refilled = 0
        self._drawn_at = 0.0
        self._live = Live(self._render(), console=console, auto_refresh=False)

    def __enter__(self) -> LiveBoard:
        self._live.__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._live.__exit__(kind, error, trace)

    def show(self, item: Tick | StreamEvent) -> None:
        now = time.monotonic()
        if isinstance(item, Tick):
            self.rows[item.symbol] = item
            self.first.setdefault(item.symbol, item.price)
            if now - self._drawn_at < REDRAW_SECONDS:
                return
        else:
            self._on_event(item)
        self._drawn_at = now
        self._live.update(self._render(), refresh=True)

    def _on_event(self, event: StreamEvent) -> None:
        if isinstance(event, Connected):
            self.state, self.style = f"live · {event.url}", "green"
        elif isinstance(event, Disconnected):
            self.state, self.style = f"reconnecting · {event}", "red"
        elif isinstance(event, Gap):
            self.gaps += 1
            self.refilled += event.refilled
            self.lost += event.missing
            self.note = str(event)
        elif isinstance(event, Reset | Dropped):
            self.note = str(event)
            if isinstance(event, Dropped):
                self.symbols = [s for s in self.symbols if s not in event.symbols]

    def _render(self) -> Group:
        table = Table(expand=False)
        for name in ("symbol", "price", "change", "bid", "ask", "seq", "time (UTC)"):
            table.add_column(name, justify="left" if name == "symbol" else "right")
        for symbol in self.symbols:
            tick = self.rows.get(symbol)
            if tick is None:
                table.add_row(symbol, "…", "", "", "", "", "")
                continue
            change = tick.price - self.first[symbol]
            colour = "green" if change > 0 else "red" if change < 0 else ""
            table.add_row(
                symbol,
                str(tick.price),
                Text(f"{change:+}", style=colour),
                str(tick.bid or ""),
                str(tick.ask or ""),
                str(tick.seq),
                tick.time.strftime("%H:%M:%S.%f")[:-3],
            )
        status = Text("● ", style=self.style) + Text(self.state)
        if self.gaps:
            status += Text(
                f" · {self.gaps} gaps: {self.refilled} ticks refilled, {self.lost} lost",
                style="yellow" if self.lost else "",
            )
        parts: list[Table | Text] = [status, table]
        if self.note:
            parts.append(Text(self.note, style="dim"))
        return Group(*parts)
