"""FEED_SOURCE=replay in a real server process: a subscriber gets the file's prices, in order,
with the row's time as `source_ts`; bad rows show in /metrics; a file that cannot play stops
every way of starting the service with one line and no traceback."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import ROOT, free_port, open_stream, server_process, token

pytestmark = pytest.mark.slow

T0 = 1_710_509_400_000  # 2024-03-15T13:30:00Z
GAP_MS = 500
SPEED = 10
ROWS = 20


def replay_file(tmp_path: Path) -> Path:
    """ROWS trades of AAPL GAP_MS apart, with a MSFT quote, an unknown symbol and a bad price
    among them."""
    lines = ["ts,symbol,price,bid,ask,size,side"]
    for i in range(ROWS):
        side = "buy" if i % 2 else "sell"
        lines.append(
            f"{T0 + i * GAP_MS},AAPL,{190 + i}.25,{190 + i}.24,{190 + i}.26,{i + 1},{side}"
        )
        if i == 3:
            lines.append(f"{T0 + i * GAP_MS},MSFT,415.50,415.49,415.51,7,buy")
            lines.append(f"{T0 + i * GAP_MS},NOPE,1.00,,,,")
        if i == 7:
            lines.append(f"{T0 + i * GAP_MS},AAPL,not-a-price,,,,")
    path = tmp_path / "ticks.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


async def read_metric(http: str, sample: str, want: float, timeout: float = 15) -> float:
    """The sample's value once it reaches `want` (the producer reports its counts every
    second), or its last value when time is up."""
    value = 0.0
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            text = (await client.get(f"{http}/metrics")).text
            value = next(
                (float(line.split()[-1]) for line in text.splitlines() if line.startswith(sample)),
                0.0,
            )
            if value >= want:
                break
            await asyncio.sleep(0.2)
    return value


async def stale_readiness(http: str, timeout: float = 15) -> dict[str, Any]:
    """/readyz's body once it reports the feed stale (still answering 200)."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while True:
            response = await client.get(f"{http}/readyz")
            assert response.status_code == 200, response.text
            body: dict[str, Any] = response.json()
            if body["checks"]["feed"] == "stale" or time.monotonic() > deadline:
                return body
            await asyncio.sleep(0.2)


async def test_a_subscriber_gets_the_files_prices_in_order(
    database_url: str, tmp_path: Path
) -> None:
    path = replay_file(tmp_path)
    server = server_process(
        tmp_path,
        "replay",
        database_url,
        FEED_SOURCE="replay",
        FEED_REPLAY_PATH=str(path),
        FEED_REPLAY_SPEED=str(SPEED),
        FEED_STALE_SECONDS="1",
    )
    server.start()
    try:
        await server.wait_ready(timeout=30)
        ticks: dict[int, dict[str, Any]] = {}
        # since=0: the ticks published before this connected first, then the rest live.
        async with open_stream(f"{server.ws}/v1/ws/prices/AAPL?token={token()}&since=0") as s:
            while len(ticks) < ROWS:
                frame = await s.recv(timeout=15)
                if frame["type"] in ("tick", "snapshot"):
                    ticks[frame["seq"]] = frame
        rejected = {
            reason: await read_metric(
                server.http,
                f'pricefeed_feed_rejected_total{{reason="{reason}",source="replay"}}',
                want=1,
            )
            for reason in ("unknown_symbol", "bad_price")
        }
        readiness = await stale_readiness(server.http)
    finally:
        server.stop()

    got = [ticks[seq] for seq in sorted(ticks)]
    assert [t["seq"] for t in got] == list(range(1, ROWS + 1))
    assert [t["price"] for t in got] == [f"{190 + i}.2500" for i in range(ROWS)]
    assert [t["source_ts"] for t in got] == [T0 + i * GAP_MS for i in range(ROWS)]
    assert [(t["bid"], t["ask"]) for t in got[:2]] == [
        ("190.2400", "190.2600"),
        ("191.2400", "191.2600"),
    ]
    assert [(t["size"], t["side"]) for t in got[:2]] == [("1", "sell"), ("2", "buy")]
    # Paced: the producer stamped them (at least, give or take its first tick's own delay)
    # the file's span divided by the speed apart, not all at once.
    span_ms = (ROWS - 1) * GAP_MS / SPEED
    assert got[-1]["ts"] - got[0]["ts"] >= 0.8 * span_ms
    assert rejected == {"unknown_symbol": 1, "bad_price": 1}
    assert "replay finished: 21 rows, 2 skipped" in server.log()
    # Played to the end (no loop): the service stays up, and says its feed went quiet.
    assert readiness["feed"]["status"] == "stale"


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "no such file"),
        (f"{T0},AAPL,189.23\n", "no header row: the first line must name the columns"),
    ],
    ids=["missing", "no-header"],
)
@pytest.mark.parametrize(
    "command",
    [
        ["-m", "app"],
        ["-m", "app.feed"],
    ],
    ids=["app", "app.feed"],
)
def test_a_file_that_cannot_play_refuses_to_start(
    database_url: str, tmp_path: Path, content: str | None, says: str, command: list[str]
) -> None:
    path = tmp_path / "ticks.csv"
    if content is not None:
        path.write_text(content)
    env = server_process(
        tmp_path,
        "refused",
        database_url,
        FEED_SOURCE="replay",
        FEED_REPLAY_PATH=str(path),
        # python -m app.feed needs Redis; it must stop before it tries to reach it.
        BROADCAST_URL="redis://127.0.0.1:1/0" if command[-1] == "app.feed" else "memory://",
    ).env

    done = subprocess.run(
        [sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )

    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"pricefeed: cannot start: FEED_REPLAY_PATH={path}: {says}")
    assert done.stderr.count("\n") == 1 and done.stderr.endswith("\n")  # that line alone
    assert "Traceback" not in done.stdout + done.stderr
    assert "Uvicorn running" not in done.stdout + done.stderr


def test_under_another_asgi_server_startup_fails_with_the_line(
    database_url: str, tmp_path: Path
) -> None:
    """`uvicorn app.main:app` (any ASGI server): the lifespan logs the line and fails startup,
    without a traceback (tests/feed/test_preflight.py: at ERROR)."""
    env = server_process(
        tmp_path,
        "refused",
        database_url,
        FEED_SOURCE="replay",
        FEED_REPLAY_PATH=str(tmp_path / "missing.csv"),
    ).env
    port = str(free_port())

    done = subprocess.run(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--port", port],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert f"cannot start: FEED_REPLAY_PATH={tmp_path}/missing.csv: no such file\n" in output
    assert "Application startup failed" in output
    assert "Traceback" not in output
    assert "Application startup complete" not in output
