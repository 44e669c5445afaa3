"""The instrument catalog: the active instruments, shared by the routes, the streams and the
producer. It is live: `replace` swaps in what the database now says (instruments added or
disabled while the service runs), and every reader sees the new set on its next look."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from app.errors import InvalidRequest, UnknownSymbol
from app.instruments.repository import InstrumentInfo
from app.prices.ticks import normalise_symbol

MAX_SYMBOLS_PER_REQUEST = 100


@dataclass(frozen=True, slots=True)
class CatalogChange:
    added: list[InstrumentInfo]
    removed: list[InstrumentInfo]


class Catalog:
    def __init__(self, instruments: Iterable[InstrumentInfo]) -> None:
        self._by_symbol = {i.symbol: i for i in instruments}
        self._version = 0

    def __contains__(self, symbol: object) -> bool:
        return symbol in self._by_symbol

    def __iter__(self) -> Iterator[InstrumentInfo]:
        return iter(list(self._by_symbol.values()))

    def __len__(self) -> int:
        return len(self._by_symbol)

    def get(self, symbol: str) -> InstrumentInfo | None:
        return self._by_symbol.get(symbol)

    @property
    def version(self) -> int:
        """Goes up by one whenever `replace` changes the set of instruments."""
        return self._version

    @property
    def instruments(self) -> list[InstrumentInfo]:
        return list(self._by_symbol.values())

    @property
    def symbols(self) -> list[str]:
        return list(self._by_symbol)

    def replace(self, instruments: Iterable[InstrumentInfo]) -> CatalogChange:
        """Make `instruments` the active set; what was added and what went."""
        fresh = {i.symbol: i for i in instruments}
        change = CatalogChange(
            added=[i for s, i in fresh.items() if self._by_symbol.get(s) != i],
            removed=[i for s, i in self._by_symbol.items() if s not in fresh],
        )
        if change.added or change.removed:
            self._by_symbol = fresh
            self._version += 1
        return change

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
