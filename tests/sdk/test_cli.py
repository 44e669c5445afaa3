"""`python -m pricefeed_client …` and its old name `python -m app.client …` (the contract's)
against a real server, as a user runs them; and the live table's status line."""

from __future__ import annotations

import asyncio
import io
import json
import os
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from decimal import Decimal

from pricefeed_client import Connected, Disconnected, Gap, Tick
from pricefeed_client.board import LiveBoard
from rich.console import Console

from tests.support import ROOT, LiveApp

LiveFactory = Callable[..., AbstractAsyncContextManager[LiveApp]]


async def start(server: LiveApp, module: str, *args: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "PRICEFEED_URL": server.http}
    env.pop("PRICEFEED_CLIENT_ID", None)
    env.pop("PRICEFEED_CLIENT_SECRET", None)
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, *args,
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def run(server: LiveApp, module: str, *args: str) -> tuple[int, str, str]:
    process = await start(server, module, *args)
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_latest_under_both_names_prints_the_tick_as_json(live: LiveFactory) -> None:
    async with live() as server:
        for module in ("pricefeed_client", "app.client"):
            code, out, err = await run(server, module, "latest", "aapl")
            assert code == 0, err
            tick = json.loads(out)
            assert tick["symbol"] == "AAPL" and isinstance(tick["price"], str)


async def test_history_and_candles_print_one_json_a_line(live: LiveFactory) -> None:
    async with live() as server:
        code, out, err = await run(server, "pricefeed_client", "history", "AAPL", "--limit", "3")
        assert code == 0, err
        seqs = [json.loads(line)["seq"] for line in out.splitlines()]
        assert len(seqs) == 3 and seqs == sorted(seqs)
        code, out, err = await run(server, "pricefeed_client", "candles", "AAPL", "--limit", "1")
        assert code == 0, err
        assert set(json.loads(out.splitlines()[0])) >= {"start", "open", "high", "low", "close"}


async def test_watch_piped_prints_symbol_seq_price_ts(live: LiveFactory) -> None:
    async with live() as server:
        process = await start(server, "app.client", "watch", "AAPL", "MSFT")
        assert process.stdout is not None
        lines = []
        async with asyncio.timeout(15):
            while len(lines) < 6:
                lines.append((await process.stdout.readline()).decode().split())
        process.terminate()
        await process.wait()
    assert {line[0] for line in lines} == {"AAPL", "MSFT"}
    assert all(int(line[1]) and Decimal(line[2]) and int(line[3]) for line in lines)


async def test_an_unknown_symbol_is_an_error_message_not_a_traceback(live: LiveFactory) -> None:
    async with live() as server:
        code, out, err = await run(server, "pricefeed_client", "watch", "NOPE")
    assert code == 1
    assert "error: stream closed with 4404: unknown symbol: 'NOPE'" in err.splitlines()
    assert "Traceback" not in err


def test_the_live_table_shows_the_connection_and_lost_ticks() -> None:
    console = Console(file=io.StringIO(), width=120, force_terminal=False, record=True)
    tick = Tick(type="tick", symbol="AAPL", price=Decimal("189.2300"), ts=1764300000123, seq=7)
    with LiveBoard(["AAPL", "MSFT"], "http://x", console=console) as board:
        board.show(Connected("ws://x/v1/ws"))
        board.show(tick)
        board.show(Gap("AAPL", 7, 20, refilled=10, missing=2))
        board.show(Disconnected(None, "", 0.4))
    text = console.export_text()
    screen = text[text.rindex("●") :]  # the last frame drawn
    assert "reconnecting · connection lost; reconnecting in 0.4s" in screen
    assert "1 gaps: 10 ticks refilled, 2 lost" in screen
    assert "189.2300" in screen and "MSFT" in screen
