"""The close codes a client developer reads in /docs are `CloseCode` itself: a row for every
member with its meaning, and no row for a code the server does not use."""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import httpx

from app.errors import CloseCode

ApiFactory = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]
TABLE_ROW = re.compile(r"^\|\s*(\d{4})\s*\|\s*(.+?)\s*\|\s*$", re.MULTILINE)


async def served_rows(api: ApiFactory) -> dict[int, str]:
    """The close-code table of the protocol page, as /openapi.json serves it: code → meaning."""
    async with api() as client:
        response = await client.get("/openapi.json")
    assert response.status_code == 200
    description = response.json()["info"]["description"]
    return {int(code): meaning for code, meaning in TABLE_ROW.findall(description)}


async def test_every_close_code_has_its_row_with_its_meaning(api: ApiFactory) -> None:
    rows = await served_rows(api)
    for code in CloseCode:
        assert rows.get(code.value) == code.meaning, f"{code.name} ({code.value})"


async def test_the_table_lists_no_other_code(api: ApiFactory) -> None:
    rows = await served_rows(api)
    assert sorted(rows) == sorted(code.value for code in CloseCode)


def test_every_code_has_a_meaning_and_a_valid_number() -> None:
    """RFC 6455: 1000-2999 for the protocol, 4000-4999 for applications; 1005, 1006 and 1015
    are never sent."""
    for code in CloseCode:
        assert code.meaning.strip(), code.name
        assert 1000 <= code < 1005 or 1007 <= code < 1015 or 4000 <= code < 5000, code.name
