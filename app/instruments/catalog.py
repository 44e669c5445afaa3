"""The instrument catalog: the active instruments, loaded once at startup and shared."""

from __future__ import annotations

from collections.abc import Iterable

from app.errors import InvalidRequest, UnknownSymbol
from app.instruments.repository import InstrumentInfo
from app.prices.ticks import normalise_symbol

MAX_SYMBOLS_PER_REQUEST = 100


class Catalog:
    def __init__(self, instruments: Iterable[InstrumentInfo]) -> None:
        self._by_symbol = {i.symbol: i for i in instruments}

    def __contains__(self, symbol: object) -> bool:
        return symbol in self._by_symbol

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._by_symbol.values())

    @property
    def instruments(self) -> list[InstrumentInfo]:
        return list(self._by_symbol.values())

    def resolve(self, raw: str) -> str:
        """The known symbol `raw` names (case-insensitive), or UnknownSymbol."""
        symbol = normalise_symbol(raw)
        if symbol is None or symbol not in self._by_symbol:
            raise UnknownSymbol(f"unknown symbol: {raw[:32]!r}")
        return symbol

    def resolve_many(self, raw: Iterable[str]) -> list[str]:
        """Known symbols, deduplicated in order; raise for an invalid or unknown one."""
        raw = list(raw)
        if len(raw) > MAX_SYMBOLS_PER_REQUEST:
            raise InvalidRequest(f"at most {MAX_SYMBOLS_PER_REQUEST} symbols per request")
        symbols: list[str] = []
        for item in raw:
            if not isinstance(item, str) or not item.strip():
                raise InvalidRequest("symbols must be non-empty strings")
            symbol = self.resolve(item)
            if symbol not in symbols:
                symbols.append(symbol)
        if not symbols:
            raise InvalidRequest("name at least one symbol")
        return symbols
