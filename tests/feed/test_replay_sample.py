"""samples/ticks.csv: what scripts/make_replay_sample.py writes, playable as it ships (every row
a tick of a seeded instrument), and in the image."""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys
from decimal import Decimal

from app.feed.sources.replay import ReplaySource
from app.feed.stats import FeedStats
from app.instruments.catalog import Catalog
from app.instruments.repository import InstrumentInfo
from tests.support import ROOT

SAMPLE = ROOT / "samples" / "ticks.csv"


def seeded_catalog() -> Catalog:
    path = ROOT / "alembic" / "versions" / "0001_initial.py"
    spec = importlib.util.spec_from_file_location("pricefeed_migration_0001", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return Catalog(
        InstrumentInfo(symbol, name, asset_class, decimals, Decimal(price))
        for symbol, name, asset_class, decimals, price in module.SEED_INSTRUMENTS
    )


def test_the_sample_is_what_the_script_writes() -> None:
    written = subprocess.run(
        [sys.executable, "scripts/make_replay_sample.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    assert written == SAMPLE.read_text()


async def test_every_row_of_the_sample_becomes_a_tick() -> None:
    stats = FeedStats("replay")
    source = ReplaySource(path=SAMPLE, shown_as=str(SAMPLE), speed=0, loop=False, stats=stats)
    rows = SAMPLE.read_text().count("\n") - 1
    quotes = []
    stream = source.stream(seeded_catalog(), {})
    try:
        while len(quotes) < rows:
            quotes += await anext(stream)
    finally:
        await stream.aclose()

    assert stats.drain() == {}
    assert {q.symbol for q in quotes} == {"AAPL", "MSFT", "BTC-USD", "EUR-USD"}
    assert all(q.bid and q.ask and q.size and q.side and q.bid <= q.price <= q.ask for q in quotes)
    # A few minutes, in order.
    stamps = [q.source_ts for q in quotes if q.source_ts is not None]
    assert stamps == sorted(stamps) and len(stamps) == rows
    assert 240_000 <= stamps[-1] - stamps[0] <= 300_000
    assert SAMPLE.stat().st_size < 200_000


def test_the_image_ships_the_sample() -> None:
    """FEED_REPLAY_PATH=samples/ticks.csv works in the container's working directory too."""
    text = (ROOT / "Dockerfile").read_text()
    final_stage = text.rsplit("\nFROM ", 1)[1]
    copies = [shlex.split(line) for line in final_stage.splitlines() if line.startswith("COPY ")]

    assert ["COPY", "--chown=pricefeed", "samples", "./samples"] in copies
    assert "WORKDIR /app" in final_stage
