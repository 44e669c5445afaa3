"""The JavaScript client (clients/js/pricefeed.js) under Node's own test runner, against real
server processes that its tests start, restart and stop (clients/js/test/harness.js): this
prepares what they need (a migrated database, a redis-server) and checks that every one of
them ran and passed."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import JWT_SECRET, ROOT, RedisServer, server_process

pytestmark = [pytest.mark.redis, pytest.mark.slow]

CLIENT = ROOT / "clients" / "js"
NODE = shutil.which("node")
# The tests clients/js/test/*.test.js hold: each must be reported as passed, none skipped or
# missing.
EXPECTED = {
    "names files that exist, and its version is the module's",
    "declares in pricefeed.d.ts exactly what pricefeed.js exports",
    "needs nothing but the platform: no import in the module",
    "reads a JWT's claims without verifying it, and null for what is not one",
    "streams a snapshot, then ticks with numeric seqs and decimal-string prices",
    "reconnects after the server restarts and resumes without a gap or a duplicate",
    "stops for good when the server refuses the token (4401)",
    "renews the token in-band before it expires, on the same connection",
    "after a 4408 it asks getToken for a fresh token and resumes without a gap",
    "refuses a symbol the token does not list, and streams the others",
    "drops what a renewed token no longer lists, and streams the rest on",
    "drops an unknown symbol the server names, and streams the others",
    "unsubscribe stops a symbol and close() goes offline",
    "reports the ticks it cannot have as a gap, and hands out none twice",
}


def node_command() -> list[str]:
    """Node with a global WebSocket: built in from Node 22, behind a flag on Node 20. Without
    one, the test skips (fails in CI, which must run it)."""
    probe = "process.exit(typeof WebSocket === 'function' ? 0 : 1)"
    if NODE is not None:
        for command in ([NODE], [NODE, "--experimental-websocket"]):
            if subprocess.run([*command, "-e", probe], capture_output=True).returncode == 0:
                return command
    reason = (
        "needs Node 20 or newer, with a WebSocket (`make test` installs Debian's nodejs when "
        "it can: scripts/ensure-node.sh)"
    )
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def passed_tests(tap: str) -> tuple[set[str], list[str]]:
    """The names of the TAP report's passed tests, and its lines that say something failed."""
    passed = {
        name
        for name, directive in re.findall(r"^\s*ok \d+ - (.+?)(?: # (.*))?$", tap, re.MULTILINE)
        if not directive.upper().startswith(("SKIP", "TODO"))  # a skipped test did not pass
    }
    failed = re.findall(r"^\s*not ok \d+ - .*$", tap, re.MULTILINE)
    return passed, failed


def test_the_javascript_client_passes_its_tests_against_a_live_server(
    redis: RedisServer, database_url: str, tmp_path: Path
) -> None:
    # The environment of tests/support.py's server processes, with Redis: seq and the retained
    # ticks outlive a restart of the server, so a client can resume without a gap.
    node = node_command()
    server = server_process(tmp_path, "js", database_url, BROADCAST_URL=redis.url)
    env = {
        **os.environ,
        "PRICEFEED_TEST_PYTHON": sys.executable,
        "PRICEFEED_TEST_ROOT": str(ROOT),
        "PRICEFEED_TEST_SERVER_ENV": json.dumps(server.env),
        "PRICEFEED_TEST_JWT_SECRET": JWT_SECRET,
    }
    tests = sorted(str(path) for path in (CLIENT / "test").glob("*.test.js"))
    run = subprocess.run(
        [*node, "--test", "--test-reporter=tap", *tests],
        cwd=CLIENT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    passed, failed = passed_tests(run.stdout)
    report = (run.stdout + run.stderr)[-6000:]
    assert run.returncode == 0 and not failed, report
    assert EXPECTED <= passed, f"missing: {sorted(EXPECTED - passed)}\n{report}"
