"""app/logs.py: OncePer, one line per window for a failure that repeats on every request."""

from __future__ import annotations

import logging

import pytest

from app import logs


def test_once_per_window_then_says_how_many_it_swallowed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    now = [1000.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: now[0])
    once = logs.OncePer(logging.getLogger("app.test"), seconds=60)

    for _ in range(5):
        once.warning("database down (%s)", "refused")
    now[0] += 61
    once.warning("database down (%s)", "refused")

    assert [r.getMessage() for r in caplog.records] == [
        "database down (refused)",
        "database down (refused) (4 more since the last such line)",
    ]
