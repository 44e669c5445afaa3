"""app/feed/preflight.py: a source that cannot start stops the service with one line, whichever
way it starts (the processes themselves: tests/feed/test_replay_server.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi import FastAPI

from app.feed.preflight import exit_unless_source_ready
from app.feed.sources import SourceNotReady
from tests.support import make_settings


def test_a_command_line_exits_2_with_the_line_on_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "ticks.csv"
    settings = make_settings(
        "sqlite+aiosqlite:///unused.db", feed_source="replay", feed_replay_path=str(missing)
    )

    with pytest.raises(SystemExit) as exited:
        exit_unless_source_ready(settings)

    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        f"pricefeed: cannot start: FEED_REPLAY_PATH={missing}: no such file\n"
    )


def test_a_source_that_can_start_passes(tmp_path: Path) -> None:
    path = tmp_path / "ticks.csv"
    path.write_text("ts,symbol,price\n")
    settings = make_settings(
        "sqlite+aiosqlite:///unused.db", feed_source="replay", feed_replay_path=str(path)
    )

    exit_unless_source_ready(settings)  # returns


async def test_the_lifespan_logs_the_line_at_error_and_fails(
    build_app: Callable[..., FastAPI], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "ticks.csv"
    app = build_app(feed_source="replay", feed_replay_path=str(missing))

    with pytest.raises(SourceNotReady):
        async with app.router.lifespan_context(app):
            pass

    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [f"cannot start: FEED_REPLAY_PATH={missing}: no such file"]


async def test_without_a_producer_the_source_is_not_checked(
    build_app: Callable[..., FastAPI], tmp_path: Path
) -> None:
    """PRODUCER=off: the workers of `python -m app` with Redis; their producer process checks."""
    app = build_app(
        feed_source="replay", feed_replay_path=str(tmp_path / "missing.csv"), producer="off"
    )

    async with app.router.lifespan_context(app):
        pass
