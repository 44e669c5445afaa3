"""app/feed/sources/replay.py on its own: what a file's rows become, when they go out (on a
clock of the test's, so spacing is asserted exactly, not against the wall), looping, and the
rows it skips and counts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest

from app.config import Settings
from app.feed.quotes import QuoteError
from app.feed.sources import Quote, SourceNotReady
from app.feed.sources.replay import BATCH_ROWS, RETRY_SECONDS, ReplaySource, create, parse_ts
from app.feed.stats import FeedStats
from app.instruments.catalog import Catalog
from app.instruments.repository import InstrumentInfo
from tests.support import FakeClock, make_settings

AAPL = InstrumentInfo("AAPL", "Apple", "equity", 4, Decimal("189.2300"))
MSFT = InstrumentInfo("MSFT", "Microsoft", "equity", 4, Decimal("415.5000"))
EURUSD = InstrumentInfo("EUR-USD", "Euro", "fx", 5, Decimal("1.08450"))
T0 = 1_710_509_400_000  # 2024-03-15T13:30:00Z


def write(tmp_path: Path, text: str, name: str = "ticks.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def rows(*lines: str, header: str = "ts,symbol,price") -> str:
    return "\n".join([header, *lines]) + "\n"


def replay(
    path: Path,
    *,
    speed: float = 1.0,
    loop: bool = False,
    clock: FakeClock | None = None,
    stats: FeedStats | None = None,
) -> ReplaySource:
    clock = clock or FakeClock()
    return ReplaySource(
        path=path,
        shown_as=str(path),
        speed=speed,
        loop=loop,
        stats=stats or FeedStats("replay"),
        clock=clock,
        sleep=clock.sleep,
    )


async def take(
    source: ReplaySource,
    count: int,
    *,
    instruments: Catalog | None = None,
    clock: FakeClock | None = None,
) -> list[tuple[float, list[Quote]]]:
    """The first batches holding `count` quotes, each with the clock's time when it came."""
    stream = source.stream(instruments or Catalog([AAPL, MSFT, EURUSD]), {})
    got: list[tuple[float, list[Quote]]] = []
    try:
        while sum(len(batch) for _, batch in got) < count:
            batch = await asyncio.wait_for(anext(stream), 5)
            got.append((clock() if clock else 0.0, batch))
    finally:
        await stream.aclose()
    return got


async def nothing_more(stream: AsyncIterator[list[Quote]]) -> bool:
    """True if the stream is idle: it neither yields nor ends."""
    try:
        await asyncio.wait_for(anext(stream), 0.2)
    except TimeoutError:
        return True
    return False


def flat(batches: list[tuple[float, list[Quote]]]) -> list[Quote]:
    return [quote for _, batch in batches for quote in batch]


def settings(path: Path | str, **overrides: object) -> Settings:
    return make_settings(
        "sqlite+aiosqlite:///unused.db",
        feed_source="replay",
        feed_replay_path=str(path),
        **overrides,
    )


class TestCreate:
    """`create` reads the header up front: a file that cannot play refuses to start."""

    def test_a_readable_file_with_a_header(self, tmp_path: Path) -> None:
        path = write(tmp_path, rows(f"{T0},AAPL,189.23"))

        assert create(settings(path), FeedStats("replay")).name == "replay"

    @pytest.mark.parametrize(
        ("content", "says"),
        [
            (None, "no such file"),
            ("", "the file is empty"),
            (f"{T0},AAPL,189.23\n", "no header row"),
            ("ts,symbol,bid\n", "the header has no price column"),
            ("when,symbol,price\n", "the header has no ts column"),
            ("ts,symbol,price,Price\n", "the header names the column 'price' twice"),
        ],
        ids=["missing", "empty", "no-header", "no-price", "no-ts", "twice"],
    )
    def test_refuses_with_one_line(self, tmp_path: Path, content: str | None, says: str) -> None:
        path = tmp_path / "ticks.csv"
        if content is not None:
            path.write_text(content)

        with pytest.raises(SourceNotReady) as raised:
            create(settings(path), FeedStats("replay"))

        message = str(raised.value)
        assert message.startswith(f"FEED_REPLAY_PATH={path}: ")
        assert says in message
        assert "\n" not in message

    def test_a_directory(self, tmp_path: Path) -> None:
        with pytest.raises(SourceNotReady, match="is a directory"):
            create(settings(tmp_path), FeedStats("replay"))

    def test_the_shipped_sample_plays(self) -> None:
        """samples/ticks.csv, as `make run` would use it."""
        sample = Path(__file__).resolve().parents[2] / "samples" / "ticks.csv"

        assert create(settings(sample), FeedStats("replay")).name == "replay"


class TestRows:
    async def test_prices_come_out_in_file_order_with_every_field(self, tmp_path: Path) -> None:
        path = write(
            tmp_path,
            rows(
                f"{T0},AAPL,189.23,189.22,189.24,,100,buy",
                f"{T0 + 5},MSFT,415.5,415.49,415.51,,20,sell",
                f"{T0 + 9},AAPL,189.2,,,,,",
                f"{T0 + 12},EUR-USD,1.0845,1.08449,1.08451,1000000,,",
                header="ts,symbol,price,bid,ask,volume,size,side",
            ),
        )

        quotes = flat(await take(replay(path, speed=0), 4))

        assert quotes == [
            Quote(
                "AAPL",
                Decimal("189.2300"),
                bid=Decimal("189.2200"),
                ask=Decimal("189.2400"),
                size=Decimal("100"),
                side="buy",
                source_ts=T0,
            ),
            Quote(
                "MSFT",
                Decimal("415.5000"),
                bid=Decimal("415.4900"),
                ask=Decimal("415.5100"),
                size=Decimal("20"),
                side="sell",
                source_ts=T0 + 5,
            ),
            Quote("AAPL", Decimal("189.2000"), source_ts=T0 + 9),
            Quote(
                "EUR-USD",
                Decimal("1.08450"),
                bid=Decimal("1.08449"),
                ask=Decimal("1.08451"),
                volume=Decimal("1000000"),
                source_ts=T0 + 12,
            ),
        ]
        # The price is at the instrument's decimals, as a tick shows it.
        assert str(quotes[2].price) == "189.2000"

    async def test_columns_in_any_order_and_others_ignored(self, tmp_path: Path) -> None:
        path = write(
            tmp_path,
            rows(
                "buy,189.23,AAPL,x,2024-03-15T13:30:00Z",
                header="Side, Price ,SYMBOL,venue,ts",
            ),
        )

        (quote,) = flat(await take(replay(path, speed=0), 1))

        assert (quote.symbol, quote.price, quote.side, quote.source_ts) == (
            "AAPL",
            Decimal("189.2300"),
            "buy",
            T0,
        )

    @pytest.mark.parametrize(
        ("raw", "ms"),
        [
            (str(T0), T0),
            ("2024-03-15T13:30:00Z", T0),
            ("2024-03-15T13:30:00.250Z", T0 + 250),
            ("2024-03-15T13:30:00.250", T0 + 250),  # naive: UTC
            ("2024-03-15 13:30:00.250+00:00", T0 + 250),
            ("2024-03-15T15:30:00+02:00", T0),
            ("0", 0),
            (f"{T0}.750", T0),  # as a database exports epoch * 1000
        ],
    )
    def test_ts_is_epoch_ms_or_iso_8601(self, raw: str, ms: int) -> None:
        assert parse_ts(raw) == ms

    @pytest.mark.parametrize(
        "raw", ["", "yesterday", "-5", "1e12", "12.", ".5", "1969-12-31T23:59:59Z", "１２３"]
    )
    def test_a_bad_ts(self, raw: str) -> None:
        with pytest.raises(QuoteError) as raised:
            parse_ts(raw)
        assert raised.value.reason == "bad_ts"

    async def test_a_file_with_a_byte_order_mark(self, tmp_path: Path) -> None:
        """As a spreadsheet exports it: the mark is not part of the first column's name."""
        path = tmp_path / "ticks.csv"
        path.write_bytes(b"\xef\xbb\xbf" + rows(f"{T0},AAPL,189.23").encode())

        (quote,) = flat(await take(replay(path, speed=0), 1))

        assert quote.source_ts == T0


class TestBadRows:
    async def test_each_kind_is_skipped_and_counted_by_reason(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        path = write(
            tmp_path,
            rows(
                f"{T0},AAPL,189.23,,",  # line 2: good
                f"{T0 + 1},NOPE,1.00,,",  # unknown symbol
                "yesterday,AAPL,189.23,,",  # bad ts
                f"{T0 + 2},AAPL,abc,,",  # bad price
                f"{T0 + 3},AAPL,-1,,",  # bad price
                f"{T0 + 4},AAPL,189.23456,,",  # too many decimals (AAPL: 4)
                f"{T0 + 5},AAPL,189.23,,short",  # bad side
                f"{T0 + 6},AAPL,189.23",  # wrong column count
                f"{T0 + 7},AAPL,189.23,,,extra",  # wrong column count
                f"{T0 + 8},AAPL,189.23,abc,",  # bad size
                f"{T0 + 9},AAPL,189.25,,",  # line 12: good
                header="ts,symbol,price,size,side",
            ),
        )
        stats = FeedStats("replay")
        caplog.set_level(logging.INFO, "app.feed")

        quotes = flat(await take(replay(path, speed=0, stats=stats), 2))

        assert [q.price for q in quotes] == [Decimal("189.2300"), Decimal("189.2500")]
        assert stats.drain() == {
            "rejected|replay|unknown_symbol": 1,
            "rejected|replay|bad_ts": 1,
            "rejected|replay|bad_price": 2,
            "rejected|replay|too_many_decimals": 1,
            "rejected|replay|bad_side": 1,
            "rejected|replay|bad_row": 2,
            "rejected|replay|bad_size": 1,
        }
        # The first of each reason is logged, naming its line.
        assert f"{path} line 3: 'NOPE' is not an active instrument" in caplog.text
        assert f"{path} line 4: ts must be epoch milliseconds or ISO 8601" in caplog.text
        assert f"{path} line 9: 3 fields, the header has 5" in caplog.text

    async def test_an_instrument_disabled_while_playing(self, tmp_path: Path) -> None:
        """Rows are checked against the instruments active when they are due."""
        path = write(
            tmp_path,
            rows(f"{T0},MSFT,415.50", f"{T0 + 1000},MSFT,415.60", f"{T0 + 2000},AAPL,189.23"),
        )
        catalog = Catalog([AAPL, MSFT])
        stats = FeedStats("replay")
        stream = replay(path, stats=stats).stream(catalog, {})
        try:
            first = await anext(stream)
            catalog.replace([AAPL])  # MSFT disabled
            second = await anext(stream)
        finally:
            await stream.aclose()

        assert [q.price for q in first] == [Decimal("415.5000")]
        assert [q.symbol for q in second] == ["AAPL"]
        assert stats.drain() == {"rejected|replay|unknown_symbol": 1}


class TestPacing:
    @pytest.mark.parametrize("speed", [1.0, 10.0, 0.5])
    async def test_spacing_is_the_files_divided_by_the_speed(
        self, tmp_path: Path, speed: float
    ) -> None:
        gaps = [0, 250, 1000, 40, 3000, 7]
        stamps = [T0 + sum(gaps[: i + 1]) for i in range(len(gaps))]
        path = write(tmp_path, rows(*(f"{ts},AAPL,189.{i}" for i, ts in enumerate(stamps))))
        clock = FakeClock()

        got = await take(replay(path, speed=speed, clock=clock), len(stamps), clock=clock)

        assert [q.source_ts for q in flat(got)] == stamps
        start = got[0][0]
        for at, batch in got:
            (quote,) = batch
            assert quote.source_ts is not None
            assert at - start == pytest.approx((quote.source_ts - T0) / 1000 / speed)

    async def test_rows_with_one_ts_go_out_in_one_batch(self, tmp_path: Path) -> None:
        path = write(
            tmp_path,
            rows(
                f"{T0},AAPL,189.20",
                f"{T0 + 500},AAPL,189.21",
                f"{T0 + 500},MSFT,415.50",
                f"{T0 + 500},AAPL,189.22",
                f"{T0 + 900},MSFT,415.51",
            ),
        )
        clock = FakeClock()

        got = await take(replay(path, clock=clock), 5, clock=clock)

        assert [[str(q.price) for q in batch] for _, batch in got] == [
            ["189.2000"],
            ["189.2100", "415.5000", "189.2200"],
            ["415.5100"],
        ]
        assert clock.sleeps == pytest.approx([0.5, 0.4])

    async def test_a_ts_that_goes_back_goes_out_at_once(self, tmp_path: Path) -> None:
        path = write(
            tmp_path,
            rows(f"{T0},AAPL,189.20", f"{T0 + 1000},AAPL,189.21", f"{T0 + 400},AAPL,189.22"),
        )
        clock = FakeClock()
        stats = FeedStats("replay")

        got = await take(replay(path, clock=clock, stats=stats), 3, clock=clock)

        assert [q.source_ts for q in flat(got)] == [T0, T0 + 1000, T0 + 400]  # file order
        assert clock.sleeps == pytest.approx([1.0])
        assert stats.drain() == {}  # not an error

    async def test_after_a_stall_it_carries_on_without_a_burst(self, tmp_path: Path) -> None:
        path = write(tmp_path, rows(*(f"{T0 + 1000 * i},AAPL,189.2{i}" for i in range(4))))
        clock = FakeClock()
        stream = replay(path, clock=clock).stream(Catalog([AAPL]), {})
        times = []
        try:
            for i in range(4):
                await anext(stream)
                times.append(clock.now)
                if i == 0:
                    clock.now += 10  # the producer took 10 s over the first batch
        finally:
            await stream.aclose()

        start = times[0]
        assert [t - start for t in times] == pytest.approx([0, 10, 11, 12])

    async def test_speed_0_sends_everything_in_batches_without_waiting(
        self, tmp_path: Path
    ) -> None:
        count = 2 * BATCH_ROWS + 200
        path = write(tmp_path, rows(*(f"{T0 + 1000 * i},AAPL,{100 + i}" for i in range(count))))
        clock = FakeClock()

        got = await take(replay(path, speed=0, clock=clock), count, clock=clock)

        assert [len(batch) for _, batch in got] == [BATCH_ROWS, BATCH_ROWS, 200]
        assert [q.price for q in flat(got)] == [Decimal(100 + i) for i in range(count)]
        assert clock.sleeps == []

    async def test_speed_0_lets_the_loop_run_while_it_reads(self, tmp_path: Path) -> None:
        """Even through a long stretch of skipped rows, other tasks get their turns."""
        count = 5 * BATCH_ROWS
        path = write(
            tmp_path, rows(*(f"{T0 + i},NOPE,1" for i in range(count)), f"{T0 + count},AAPL,1")
        )
        turns = 0

        async def other_task() -> None:
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(other_task())
        await asyncio.sleep(0)
        turns = 0
        try:
            await take(replay(path, speed=0), 1)
        finally:
            task.cancel()
        assert turns >= 5


class TestEnd:
    async def test_without_loop_it_logs_and_idles(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        path = write(tmp_path, rows(f"{T0},AAPL,189.20", f"{T0 + 1},NOPE,1", f"{T0 + 2},AAPL,1"))
        caplog.set_level(logging.INFO, "app.feed")
        stream = replay(path, speed=0).stream(Catalog([AAPL]), {})
        try:
            (batch,) = [await anext(stream)]
            assert len(batch) == 2
            assert await nothing_more(stream)  # idle: not ended, not repeating
        finally:
            await stream.aclose()
        assert "replay finished: 2 rows, 1 skipped" in caplog.text

    async def test_loop_moves_source_ts_forward_every_pass(self, tmp_path: Path) -> None:
        # Gaps 1000 and 2000: median (low) 1000; span 3000: each pass is 4000 ms later.
        path = write(
            tmp_path,
            rows(f"{T0},AAPL,189.20", f"{T0 + 1000},AAPL,189.21", f"{T0 + 3000},AAPL,189.22"),
        )
        clock = FakeClock()

        got = await take(replay(path, loop=True, clock=clock), 9, clock=clock)

        stamps = [q.source_ts for q in flat(got)]
        assert stamps == [T0 + p * 4000 + d for p in range(3) for d in (0, 1000, 3000)]
        assert [str(q.price) for q in flat(got)] == ["189.2000", "189.2100", "189.2200"] * 3
        # Paced across the seam too: the first row of a pass one median gap after the last.
        start = got[0][0]
        assert [at - start for at, _ in got] == pytest.approx(
            [(ts - T0) / 1000 for ts in stamps if ts is not None]
        )

    async def test_loop_over_a_file_with_no_good_row_idles(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        path = write(tmp_path, rows(f"{T0},NOPE,1", "bad,AAPL,1"))
        stats = FeedStats("replay")
        caplog.set_level(logging.INFO, "app.feed")
        stream = replay(path, speed=0, loop=True, stats=stats).stream(Catalog([AAPL]), {})
        try:
            assert await nothing_more(stream)
        finally:
            await stream.aclose()

        # One pass, counted once: it did not go round and round.
        assert stats.drain() == {"rejected|replay|unknown_symbol": 1, "rejected|replay|bad_ts": 1}
        assert caplog.text.count("became a tick in a whole pass") == 1

    async def test_a_file_gone_between_passes_is_tried_again(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        text = rows(f"{T0},AAPL,189.20", f"{T0 + 1000},AAPL,189.21")
        path = write(tmp_path, text)
        clock = FakeClock()
        caplog.set_level(logging.INFO, "app.feed")
        stream = replay(path, loop=True, clock=clock).stream(Catalog([AAPL]), {})
        try:
            first_pass = [await anext(stream), await anext(stream)]
            path.unlink()
            next_batch = asyncio.ensure_future(anext(stream))
            while clock.sleeps.count(RETRY_SECONDS) < 3:
                await asyncio.sleep(0)
            assert not next_batch.done()
            path.write_text(text)  # back
            (quote,) = await asyncio.wait_for(next_batch, 5)
        finally:
            await stream.aclose()

        assert [q.source_ts for b in first_pass for q in b] == [T0, T0 + 1000]
        assert quote.source_ts == T0 + 2000  # the next pass, as if nothing happened
        # Said once, not at every retry; and when it is over.
        assert caplog.text.count(f"FEED_REPLAY_PATH={path}: no such file; trying every 5s") == 1
        assert f"FEED_REPLAY_PATH={path} is readable again" in caplog.text
