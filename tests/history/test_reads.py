"""History reads (app/history/reads.py, app/history/service.py) through the REST routes, on a
seeded, known series: rows written straight into the tables, ticks straight into the window,
on SQLite and on the local PostgreSQL. The producer is off: nothing else ticks."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import event, text

from app.deps import AppState
from app.history.models import CandleRecord, TickRecord
from app.main import create_app
from app.prices.candles import Candle
from app.prices.store import Run
from app.prices.ticks import Tick, encode_tick
from tests.support import make_settings, migrate, token

T0 = 1_764_300_000_000  # a whole minute
ALL = {"Authorization": f"Bearer {token(ttl=3600)}"}


def series_tick(seq: int, symbol: str = "AAPL") -> Tick:
    """Tick `seq` of the known series: four ticks share each ts, 10 ms apart."""
    return encode_tick(
        symbol=symbol,
        price=Decimal("100.00") + Decimal(seq) / 100,
        ts=T0 + (seq - 1) // 4 * 10,
        seq=seq,
        volume=Decimal(seq),
    )


SERIES = [series_tick(seq) for seq in range(1, 51)]  # 1..50


def frames(seqs: range | list[int]) -> list[dict[str, Any]]:
    return [orjson.loads(SERIES[seq - 1].frame) for seq in seqs]


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    if request.param == "sqlite":
        url: str = request.getfixturevalue("database_url")
        return url
    url = request.getfixturevalue("postgres_url")
    migrate(url)
    return url


@contextlib.asynccontextmanager
async def app_and_state(
    db_url: str, **settings: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, AppState]]:
    """A REST client on an in-process app (producer off, a window of 20 ticks), and the state
    its lifespan built, to seed the store and the tables."""
    settings = {"producer": "off", "retention_ticks": 20, **settings}
    app = create_app(make_settings(db_url, **settings))
    async with app.router.lifespan_context(app) as lifespan_state:
        state: AppState = lifespan_state["app"]

        async def with_state(scope: Any, receive: Any, send: Any) -> None:
            scope["state"] = dict(lifespan_state)
            await app(scope, receive, send)

        transport = httpx.ASGITransport(app=with_state)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client, state


async def store_ticks(state: AppState, seqs: range, candles: list[Candle] | None = None) -> None:
    """The window: ticks `seqs` (and 1m candle states with the last one), as the producer keeps
    them; with a window of 20, only the newest 20 stay."""
    ticks = [SERIES[seq - 1] for seq in seqs]
    await state.store.append_runs(
        [Run("AAPL", ticks, [("1m", c) for c in candles or []])], fence=None
    )


async def db_ticks(state: AppState, seqs: range | list[int]) -> None:
    """The table: ticks `seqs`, as the history writer stores them."""
    async with state.sessions() as session:
        session.add_all(
            TickRecord(symbol=t.symbol, seq=t.seq, ts=t.ts, frame=t.frame)
            for t in (SERIES[seq - 1] for seq in seqs)
        )
        await session.commit()


@contextlib.contextmanager
def tick_queries(state: AppState) -> Iterator[list[str]]:
    """The SQL statements that read the ticks table while the block runs."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if re.search(r"\bticks\b", statement):
            seen.append(statement)

    event.listen(state.engine.sync_engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(state.engine.sync_engine, "before_cursor_execute", record)


async def history(client: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    response = await client.get("/v1/prices/AAPL/history", params=params, headers=ALL)
    assert response.status_code == 200, response.text
    body: list[dict[str, Any]] = response.json()
    return body


class TestHistorySince:
    async def test_one_answer_across_the_database_and_the_window(self, db_url: str) -> None:
        async with app_and_state(db_url) as (client, state):
            await store_ticks(state, range(1, 51))  # the window keeps 31..50
            await db_ticks(state, range(1, 41))

            assert await history(client, since=5) == frames(range(6, 51))
            assert await history(client, since=0, limit=3) == frames(range(1, 4))

    async def test_inside_the_window_the_database_is_not_read(self, db_url: str) -> None:
        async with app_and_state(db_url) as (client, state):
            await store_ticks(state, range(1, 51))
            await db_ticks(state, range(1, 41))
            with tick_queries(state) as queries:
                inside = await history(client, since=30)
                at_latest = await history(client, since=50)
            with tick_queries(state) as beyond:
                await history(client, since=29)

        assert inside == frames(range(31, 51))
        assert at_latest == []
        assert queries == [], "the window reaches back to since: no database query"
        assert beyond, "one seq further back, the database is read"

    async def test_limit_counts_across_both(self, db_url: str) -> None:
        async with app_and_state(db_url) as (client, state):
            await store_ticks(state, range(1, 51))
            await db_ticks(state, range(1, 41))

            assert await history(client, since=25, limit=10) == frames(range(26, 36))

    async def test_ticks_stored_nowhere_are_a_visible_jump(self, db_url: str) -> None:
        async with app_and_state(db_url) as (client, state):
            await store_ticks(state, range(1, 51))
            await db_ticks(state, range(1, 26))  # 26..30: in neither

            got = await history(client, since=20)

        assert got == frames([*range(21, 26), *range(31, 51)])

    async def test_an_empty_window_is_answered_from_the_database(self, db_url: str) -> None:
        """Redis restarted empty: the database still has them."""
        async with app_and_state(db_url) as (client, state):
            await db_ticks(state, range(1, 41))

            assert await history(client, since=10) == frames(range(11, 41))

    async def test_the_newest_without_since_reach_into_the_database(self, db_url: str) -> None:
        async with app_and_state(db_url) as (client, state):
            await store_ticks(state, range(1, 51))
            await db_ticks(state, range(1, 41))

            assert await history(client, limit=30) == frames(range(21, 51))
            assert await history(client, limit=5) == frames(range(46, 51))


class TestDatabaseDown:
    async def test_a_read_the_window_cannot_answer_alone_is_503(self, database_url: str) -> None:
        async with app_and_state(database_url) as (client, state):
            await store_ticks(state, range(1, 51))
            async with state.engine.begin() as conn:  # every tick query fails from now on
                await conn.execute(text("DROP TABLE ticks"))
            inside = await client.get("/v1/prices/AAPL/history", params={"since": 40}, headers=ALL)
            beyond = await client.get("/v1/prices/AAPL/history", params={"since": 5}, headers=ALL)
            ranged = await client.get("/v1/prices/AAPL/history", params={"start": T0}, headers=ALL)

        assert inside.status_code == 200, "inside the window the database is not needed"
        assert [t["seq"] for t in inside.json()] == list(range(41, 51))
        for response in (beyond, ranged):
            assert response.status_code == 503
            assert response.json() == {
                "detail": "tick history unavailable; retry shortly",
                "code": "unavailable",
            }


def next_link(response: httpx.Response) -> str | None:
    link = response.headers.get("link")
    if link is None:
        return None
    match = re.fullmatch(r'<([^>]+)>; rel="next"', link)
    assert match, link
    return match.group(1)


class TestHistoryRange:
    async def test_pages_through_ticks_sharing_a_millisecond_by_link(self, db_url: str) -> None:
        """Four ticks per ts, seven per page: pages end inside a millisecond, and the cursor
        neither skips nor repeats any; 41..44 are in the window only (not written yet)."""
        async with app_and_state(db_url) as (client, state):
            await store_ticks(state, range(1, 51))
            await db_ticks(state, range(1, 41))
            url: str | None = "/v1/prices/AAPL/history"
            params: dict[str, Any] | None = {"start": T0 + 20, "end": T0 + 110, "limit": 7}
            pages = []
            while url is not None:
                response = await client.get(url, params=params, headers=ALL)
                assert response.status_code == 200, response.text
                pages.append(response.json())
                url, params = next_link(response), None

        assert [len(p) for p in pages] == [7, 7, 7, 7, 7, 1]
        assert [t for page in pages for t in page] == frames(range(9, 45))

    async def test_a_range_is_oldest_first_in_ts_then_seq(self, db_url: str) -> None:
        async with app_and_state(db_url) as (client, state):
            await db_ticks(state, range(1, 41))
            response = await client.get(
                "/v1/prices/AAPL/history",
                params={"start": T0, "end": T0 + 10, "limit": 1000},
                headers=ALL,
            )

        assert response.json() == frames(range(1, 5))
        assert "link" not in response.headers, "nothing more: no next link"

    async def test_a_range_ending_now_holds_what_is_not_written_yet(self, db_url: str) -> None:
        async with app_and_state(db_url) as (client, state):
            await store_ticks(state, range(1, 51))
            await db_ticks(state, range(1, 46))
            response = await client.get(
                "/v1/prices/AAPL/history", params={"start": T0 + 100}, headers=ALL
            )

        assert response.json() == frames(range(41, 51))


BAD_HISTORY = [
    pytest.param({"since": 3, "start": T0}, "either since", id="since-with-start"),
    pytest.param({"since": 3, "end": T0}, "either since", id="since-with-end"),
    pytest.param({"start": T0, "end": T0}, "greater than start", id="end-equal-start"),
    pytest.param({"start": T0, "end": T0 - 1}, "greater than start", id="end-before-start"),
    pytest.param({"end": T0}, "need start", id="end-without-start"),
    pytest.param({"start": T0, "cursor": "x"}, "cursor", id="bad-cursor"),
    pytest.param({"start": T0, "cursor": "12:-1"}, "cursor", id="negative-cursor"),
    pytest.param({"cursor": "1:2"}, "need start", id="cursor-without-start"),
    pytest.param({"start": T0, "limit": 0}, "limit", id="limit-0"),
    pytest.param({"start": T0, "limit": 1001}, "limit", id="limit-1001"),
    pytest.param({"start": "1.5"}, "start", id="start-not-integer"),
    pytest.param({"start": "soon"}, "start", id="start-text"),
    pytest.param({"start": T0, "end": "1e12"}, "end", id="end-not-integer"),
    pytest.param({"start": -1}, "start", id="start-negative"),
    pytest.param({"start": 2**63}, "start", id="start-past-int64"),
]


class TestBadInput:
    @pytest.mark.parametrize(("params", "says"), BAD_HISTORY)
    async def test_history_refuses_with_422(
        self, database_url: str, params: dict[str, Any], says: str
    ) -> None:
        async with app_and_state(database_url) as (client, _):
            response = await client.get("/v1/prices/AAPL/history", params=params, headers=ALL)

        assert response.status_code == 422
        body = response.json()
        assert body["code"] == "invalid_request"
        assert says in body["detail"]

    @pytest.mark.parametrize(
        ("params", "says"),
        [
            pytest.param({"start": T0, "end": T0}, "greater than start", id="end-equal-start"),
            pytest.param({"interval": "1w"}, "interval", id="interval-1w"),
            pytest.param({"start": "noon"}, "start", id="start-text"),
            pytest.param({"limit": 1001}, "limit", id="limit-1001"),
        ],
    )
    async def test_candles_refuse_with_422(
        self, database_url: str, params: dict[str, Any], says: str
    ) -> None:
        async with app_and_state(database_url) as (client, _):
            response = await client.get("/v1/prices/AAPL/candles", params=params, headers=ALL)

        assert response.status_code == 422
        assert response.json()["code"] == "invalid_request"
        assert says in response.json()["detail"]

    @pytest.mark.parametrize("route", ["history?start=0&end=1", "history?since=0", "candles"])
    async def test_unknown_symbol_is_404_and_not_entitled_is_403(
        self, database_url: str, route: str
    ) -> None:
        only_msft = {"Authorization": f"Bearer {token(symbols=['MSFT'])}"}
        async with app_and_state(database_url) as (client, _):
            unknown = await client.get(f"/v1/prices/NOPE/{route}", headers=ALL)
            denied = await client.get(f"/v1/prices/AAPL/{route}", headers=only_msft)

        assert (unknown.status_code, unknown.json()["code"]) == (404, "unknown_symbol")
        assert (denied.status_code, denied.json()["code"]) == (403, "forbidden")


def candle(start: int, o: str, h: str, lo: str, c: str, v: str) -> Candle:
    return Candle(start, Decimal(o), Decimal(h), Decimal(lo), Decimal(c), Decimal(v))


def as_json(c: Candle) -> dict[str, Any]:
    return {
        "start": c.start,
        "open": str(c.open),
        "high": str(c.high),
        "low": str(c.low),
        "close": str(c.close),
        "volume": str(c.volume),
    }


STORED = [  # closed, and one (T0 + 120 s) that was forming when the writer last wrote it
    candle(T0, "100.10", "100.90", "99.80", "100.50", "12.5"),
    candle(T0 + 60_000, "100.50", "101.25", "100.05", "101.00", "7"),
    candle(T0 + 120_000, "101.00", "101.10", "100.95", "101.05", "1"),
]
FORMING = [  # the store's: T0 + 120 s moved on since, and T0 + 180 s began
    candle(T0 + 120_000, "101.00", "101.80", "100.90", "101.70", "4.25"),
    candle(T0 + 180_000, "101.70", "101.75", "101.60", "101.65", "0.5"),
]
DAYS = [candle(T0 - 86_400_000, "90", "101", "89.5", "100.10", "1234.5")]


async def db_candles(state: AppState, interval: str, candles: list[Candle]) -> None:
    async with state.sessions() as session:
        session.add_all(
            CandleRecord(symbol="AAPL", interval=interval, **as_json(c)) for c in candles
        )
        await session.commit()


async def read_candles(client: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    response = await client.get("/v1/prices/AAPL/candles", params=params, headers=ALL)
    assert response.status_code == 200, response.text
    body: list[dict[str, Any]] = response.json()
    return body


class TestCandles:
    async def test_stored_candles_with_the_forming_one_from_the_store(self, db_url: str) -> None:
        async with app_and_state(db_url) as (client, state):
            await db_candles(state, "1m", STORED)
            await store_ticks(state, range(1, 3), candles=FORMING)

            every = await read_candles(client, interval="1m")
            ranged = await read_candles(client, interval="1m", start=T0 + 60_000, end=T0 + 180_000)
            newest_two = await read_candles(client, interval="1m", limit=2)
            from_start = await read_candles(client, interval="1m", start=T0, limit=2)

        assert every == [as_json(c) for c in [*STORED[:2], *FORMING]]
        assert ranged == [as_json(STORED[1]), as_json(FORMING[0])]
        assert newest_two == [as_json(c) for c in FORMING]
        assert from_start == [as_json(c) for c in STORED[:2]]

    async def test_candles_outlive_a_restart_of_every_instance(self, db_url: str) -> None:
        """A new process, an empty store: the database still has every candle, exact."""
        async with app_and_state(db_url) as (_, state):
            await db_candles(state, "1m", STORED)
            await db_candles(state, "1d", DAYS)
        async with app_and_state(db_url) as (client, _):
            minutes = await read_candles(client, interval="1m")
            days = await read_candles(client, interval="1d")
            hours = await read_candles(client, interval="1h")

        assert minutes == [as_json(c) for c in STORED]
        assert days == [as_json(c) for c in DAYS]
        assert hours == []
