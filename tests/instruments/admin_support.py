"""`python -m app.admin` run as an operator runs it: a process of its own on the test's
database."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support import ROOT, TEST_ENV


def run_admin(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.admin", *args],
        cwd=ROOT,
        env={**os.environ, **TEST_ENV, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=60,
    )


def admin_ok(database_url: str, *args: str) -> str:
    """Run a command that must succeed; its one line of output."""
    done = run_admin(database_url, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def add_instrument(database_url: str, symbol: str, *more: str) -> str:
    return admin_ok(
        database_url,
        "add-instrument",
        "--symbol",
        symbol,
        "--name",
        f"{symbol} test instrument",
        "--asset-class",
        "crypto",
        "--decimals",
        "4",
        *more,
    )


def disable_instrument(database_url: str, symbol: str) -> str:
    return admin_ok(database_url, "disable-instrument", "--symbol", symbol)
