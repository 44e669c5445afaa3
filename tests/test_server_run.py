"""`python -m app`'s producer process (app/server/run.py): restarted after a crash with
backoff, and a normal stop of the service is no error."""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis

from app.backoff import Backoff
from app.server.run import ProducerProcess
from tests.support import open_stream, redis_server, server_process, token


def runs_of(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.02)


def producer_that(tmp_path: Path, exits: str, backoff: Backoff) -> tuple[ProducerProcess, Path]:
    """A stand-in producer that notes each run in a file, then `exits` (Python code)."""
    log = tmp_path / "runs"
    script = f"open({str(log)!r}, 'a').write('run\\n'); {exits}"
    return ProducerProcess([sys.executable, "-c", script], backoff=backoff), log


def producer_records(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "app.server" and r.levelno == level]


class TestProducerProcess:
    def test_a_crash_is_an_error_and_the_producer_restarts_with_backoff(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        producer, log = producer_that(tmp_path, "raise SystemExit(3)", Backoff(base=0.05, cap=0.1))
        producer.start()
        try:
            until(lambda: runs_of(log) >= 3)
        finally:
            producer.stop()
        errors = producer_records(caplog, logging.ERROR)
        assert len(errors) >= 2
        assert all(e.startswith("producer process exited with 3; restarting it in") for e in errors)

    def test_a_producer_stopped_by_a_signal_is_restarted_without_an_error(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Stopped by someone else (a signal to every process of the service reaches it before
        the server's own stop()): no crash; restarted unless the server stops meanwhile."""
        caplog.set_level(logging.INFO, logger="app.server")
        producer, log = producer_that(
            tmp_path,
            "import os, signal; os.kill(os.getpid(), signal.SIGTERM)",
            Backoff(base=0.05, cap=0.1),
        )
        producer.start()
        try:
            until(lambda: runs_of(log) >= 2)
        finally:
            producer.stop()
        assert producer_records(caplog, logging.ERROR) == []
        assert producer_records(caplog, logging.INFO)[0].startswith(
            f"producer process stopped (exit {-signal.SIGTERM}); restarting it in"
        )

    def test_stop_cuts_the_wait_before_a_restart_short(self, tmp_path: Path) -> None:
        producer, log = producer_that(tmp_path, "raise SystemExit(3)", Backoff(base=30, cap=30))
        producer.start()
        until(lambda: runs_of(log) == 1)
        started = time.monotonic()
        producer.stop()
        assert time.monotonic() - started < 2, "stop() waited out the backoff"
        assert runs_of(log) == 1


@pytest.mark.redis
@pytest.mark.slow
async def test_sigterm_to_the_process_group_stops_the_service_without_a_producer_error(
    database_url: str, tmp_path: Path
) -> None:
    """What a terminal's Ctrl+C or `kill -TERM -- -pgid` does: every process of the group gets
    the signal. The server stops, then its producer (which releases its lease: a long one
    here, which would outlive a producer killed instead), and nothing logs the producer's exit
    as a crash or starts it again; the service exits as SIGTERM's default would."""
    with redis_server() as redis:
        server = server_process(
            tmp_path, "group", database_url, BROADCAST_URL=redis.url, LEADER_LEASE_MS="60000"
        )
        server.own_group = True
        server.start()
        try:
            await server.wait_ready(timeout=30)
            async with open_stream(f"{server.ws}/v1/ws?token={token()}") as stream:
                await stream.send({"op": "subscribe", "symbols": ["AAPL"]})
                await stream.recv_type("tick", timeout=10)  # the producer process publishes
                server.signal_group(signal.SIGTERM)
                await stream.closed_with(10)
            assert server.process is not None
            code = server.process.wait(20)
            client = Redis.from_url(redis.url)
            leader = await client.get("pricefeed:producer:leader")
            await client.aclose()
        finally:
            server.stop()
    log = server.log()
    assert code == -signal.SIGTERM, log[-3000:]
    assert leader is None, "the producer released its lease"
    assert "producer process" not in log, log[-3000:]
    assert " ERROR " not in log, log[-3000:]
