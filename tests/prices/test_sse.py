"""app/prices/sse.py: `GET /v1/stream`, Server-Sent Events over a real uvicorn server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests import frames
from tests.support import SERVER_VARIANTS, LiveApp, token

LiveFactory = Callable[..., AbstractAsyncContextManager[LiveApp]]


@dataclass
class Event:
    event: str
    id: str
    data: dict[str, Any]

    @property
    def symbol(self) -> str:
        return self.id.partition(":")[0]

    @property
    def seq(self) -> int:
        return int(self.id.partition(":")[2])


class EventReader:
    """Reads an SSE body event by event; every read is bounded by a timeout."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def _read_block(self) -> dict[str, str]:
        fields: dict[str, str] = {}
        async for line in self._lines:
            if line == "":
                if fields:
                    return fields
                continue
            if line.startswith(":"):
                continue  # a comment (keep-alive)
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        raise EOFError(f"stream ended; pending fields {fields}")

    async def next(self, timeout: float = 5.0) -> Event:
        """The next event that carries data (skips `retry:` and keep-alives)."""
        deadline = time.monotonic() + timeout
        while True:
            fields = await asyncio.wait_for(
                self._read_block(), max(deadline - time.monotonic(), 0.01)
            )
            if "data" in fields:
                frames.record("events", json.loads(fields["data"]))
                return Event(
                    event=fields.get("event", "message"),
                    id=fields.get("id", ""),
                    data=json.loads(fields["data"]),
                )

    async def collect(
        self, enough: Callable[[list[Event]], bool], timeout: float = 5.0
    ) -> list[Event]:
        events: list[Event] = []
        deadline = time.monotonic() + timeout
        while not enough(events):
            events.append(await self.next(max(deadline - time.monotonic(), 0.01)))
        return events


@pytest.fixture
async def server(live: LiveFactory) -> AsyncIterator[LiveApp]:
    async with live() as server:
        yield server


@pytest.fixture
async def http(server: LiveApp) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.http, timeout=5) as client:
        yield client


@asynccontextmanager
async def open_events(
    http: httpx.AsyncClient, params: dict[str, str], headers: dict[str, str] | None = None
) -> AsyncIterator[EventReader]:
    async with http.stream("GET", "/v1/stream", params=params, headers=headers) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        yield EventReader(response)


async def wait_for_seq(http: httpx.AsyncClient, symbol: str, seq: int, timeout: float = 5.0) -> int:
    """Poll the REST latest price until `symbol` reached `seq`; its latest seq."""
    headers = {"Authorization": f"Bearer {token()}"}
    deadline = time.monotonic() + timeout
    while True:
        response = await http.get(f"/v1/prices/{symbol}", headers=headers)
        if response.status_code == 200 and response.json()["seq"] >= seq:
            latest: int = response.json()["seq"]
            return latest
        if time.monotonic() > deadline:
            raise TimeoutError(f"{symbol} did not reach seq {seq}")
        await asyncio.sleep(0.02)


def by_symbol(events: list[Event]) -> dict[str, list[Event]]:
    grouped: dict[str, list[Event]] = {}
    for event in events:
        grouped.setdefault(event.symbol, []).append(event)
    return grouped


def ticks_each(symbols: list[str], count: int) -> Callable[[list[Event]], bool]:
    def enough(events: list[Event]) -> bool:
        grouped = by_symbol(events)
        return all(sum(e.event == "tick" for e in grouped.get(s, ())) >= count for s in symbols)

    return enough


def assert_well_formed(event: Event) -> None:
    assert event.event in ("snapshot", "tick")
    assert event.data["type"] == event.event
    assert event.id == f"{event.data['symbol']}:{event.data['seq']}"
    assert isinstance(event.data["price"], str)
    assert type(event.data["ts"]) is int


# The same events whatever serves WebSockets: the variants change the server's WebSocket
# protocol and the write mode of the hub that SSE streams share with them.
@SERVER_VARIANTS
class TestStream:
    async def test_snapshot_then_ticks_per_symbol(self, http: httpx.AsyncClient) -> None:
        await wait_for_seq(http, "AAPL", 1)
        await wait_for_seq(http, "MSFT", 1)

        async with open_events(http, {"symbols": "AAPL,MSFT", "token": token()}) as reader:
            assert reader.response.headers["content-type"].startswith("text/event-stream")
            events = await reader.collect(ticks_each(["AAPL", "MSFT"], 3))

        grouped = by_symbol(events)
        assert set(grouped) == {"AAPL", "MSFT"}
        for symbol, stream in grouped.items():
            for event in stream:
                assert_well_formed(event)
                assert event.data["symbol"] == symbol
            assert stream[0].event == "snapshot"
            assert all(e.event == "tick" for e in stream[1:])
            seqs = [e.seq for e in stream]
            # seq order, no duplicate, and no gap for a reader that keeps up
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))

    async def test_both_snapshots_come_before_any_tick(self, http: httpx.AsyncClient) -> None:
        await wait_for_seq(http, "AAPL", 1)
        await wait_for_seq(http, "MSFT", 1)

        async with open_events(http, {"symbols": "AAPL,MSFT", "token": token()}) as reader:
            first = [await reader.next(), await reader.next()]

        assert [e.event for e in first] == ["snapshot", "snapshot"]
        assert {e.symbol for e in first} == {"AAPL", "MSFT"}

    async def test_bearer_header_is_accepted(self, http: httpx.AsyncClient) -> None:
        await wait_for_seq(http, "AAPL", 1)

        async with open_events(
            http, {"symbols": "aapl"}, headers={"Authorization": f"Bearer {token()}"}
        ) as reader:
            snapshot = await reader.next()

        assert snapshot.event == "snapshot"
        assert snapshot.symbol == "AAPL"

    async def test_last_event_id_resumes_after_that_seq(self, http: httpx.AsyncClient) -> None:
        latest = await wait_for_seq(http, "AAPL", 6)
        await wait_for_seq(http, "MSFT", 1)
        resume_from = latest - 3

        async with open_events(
            http,
            {"symbols": "AAPL,MSFT", "token": token()},
            headers={"Last-Event-ID": f"AAPL:{resume_from}"},
        ) as reader:
            events = await reader.collect(ticks_each(["AAPL", "MSFT"], 4))

        grouped = by_symbol(events)
        aapl = grouped["AAPL"]
        assert aapl[0].seq == resume_from + 1
        assert all(e.event == "tick" for e in aapl)  # no snapshot for the resumed symbol
        assert [e.seq for e in aapl] == list(range(resume_from + 1, resume_from + 1 + len(aapl)))
        for event in aapl:
            assert_well_formed(event)
        assert grouped["MSFT"][0].event == "snapshot"  # the others start afresh


class TestStreamRefused:
    @pytest.mark.parametrize(
        "params",
        [
            pytest.param({"symbols": "AAPL"}, id="no-token"),
            pytest.param({"symbols": "AAPL", "token": "garbage"}, id="garbage-token"),
            pytest.param({"symbols": "AAPL", "token": token(ttl=-30)}, id="expired-token"),
        ],
    )
    async def test_no_or_bad_token_is_401(
        self, http: httpx.AsyncClient, params: dict[str, str]
    ) -> None:
        response = await http.get("/v1/stream", params=params)

        assert response.status_code == 401
        assert response.headers["www-authenticate"].split()[0] == "Bearer"

    async def test_not_entitled_is_403(self, http: httpx.AsyncClient) -> None:
        response = await http.get(
            "/v1/stream", params={"symbols": "MSFT,AAPL", "token": token(symbols=["MSFT"])}
        )

        assert response.status_code == 403
        assert "event:" not in response.text

    async def test_unknown_symbol_is_404(self, http: httpx.AsyncClient) -> None:
        response = await http.get("/v1/stream", params={"symbols": "AAPL,NOPE", "token": token()})

        assert response.status_code == 404

    @pytest.mark.parametrize(
        "last_event_id", ["garbage", "AAPL:", "AAPL:-1", "AAPL:x", "$$:5", ":5", "AAPL:1.5"]
    )
    async def test_bad_last_event_id_is_422(
        self, http: httpx.AsyncClient, last_event_id: str
    ) -> None:
        response = await http.get(
            "/v1/stream",
            params={"symbols": "AAPL", "token": token()},
            headers={"Last-Event-ID": last_event_id},
        )

        assert response.status_code == 422

    async def test_non_ascii_digit_in_last_event_id_is_422(self, http: httpx.AsyncClient) -> None:
        """`²` (latin-1 0xB2) passes str.isdigit() but is no number: still a client error."""
        response = await http.get(
            "/v1/stream",
            params={"symbols": "AAPL", "token": token()},
            headers={"Last-Event-ID": b"AAPL:\xb2"},
        )

        assert response.status_code == 422
