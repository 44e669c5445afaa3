"""Run the service under uvicorn with every setting applied: WebSocket implementation (as
app/server/guard.py resolves it), frame size limit, compression, workers, log redaction; and,
with Redis, the producer in a process of its own.

The producer must not share its fate with the fan-out: in the same event loop, a burst of
client work would delay ticks. So with `BROADCAST_URL=redis://…` and `PRODUCER=on`, this
starts `python -m app.feed` beside the workers (restarting it if it dies) and runs the workers
with `PRODUCER=off`. With `memory://` everything stays in one process.

The producer runs in a process group of its own: a Ctrl+C or a SIGTERM to the service's group
stops the server, which then stops its producer (releasing its lease), instead of both racing
to exit, where a producer that was first looked like a crash and was restarted mid-shutdown.
"""

from __future__ import annotations

import logging
import logging.config
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType

import uvicorn

from app.backoff import Backoff
from app.config import Settings, get_settings
from app.feed.leader import instance_name
from app.feed.preflight import exit_unless_source_ready
from app.logs import logging_config
from app.server import guard

logger = logging.getLogger("app.server")

_FD_HEADROOM = 64  # descriptors beside the connections: listeners, database, Redis, logs
# How a producer exits when asked to (its SIGTERM/SIGINT handler returns 0; or the signal
# itself): no crash, whoever sent it, most likely a stop of the whole service.
_ASKED_TO_STOP = frozenset({0, -signal.SIGTERM, -signal.SIGINT})


class ProducerProcess:
    """`python -m app.feed`, kept running until `stop()`: restarted after a crash, with
    exponential backoff (`Backoff`), the wait cut short by `stop()`."""

    def __init__(
        self,
        command: Sequence[str] = (sys.executable, "-m", "app.feed"),
        *,
        backoff: Backoff | None = None,
    ) -> None:
        self._command = list(command)
        self._backoff = backoff or Backoff(base=0.5, cap=10.0)
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # no start after stop() looked
        self._thread = threading.Thread(target=self._keep_running, name="producer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _keep_running(self) -> None:
        env = {**os.environ, "PRICEFEED_PARENT_PID": str(os.getpid())}
        while True:
            with self._lock:
                if self._stopping.is_set():
                    return
                started = time.monotonic()
                process = self._process = subprocess.Popen(self._command, env=env, process_group=0)
            code = process.wait()
            if self._stopping.is_set():
                return
            delay = self._backoff.next_delay(ran_for=time.monotonic() - started)
            if code in _ASKED_TO_STOP:
                # Someone stopped it: a signal to every process of the service's cgroup (say,
                # systemd's default) reaches it before the server's own stop() does.
                logger.info(
                    "producer process stopped (exit %s); restarting it in %.1fs unless the "
                    "server stops",
                    code,
                    delay,
                )
            else:
                logger.error("producer process exited with %s; restarting it in %.1fs", code, delay)
            if self._stopping.wait(delay):
                return

    def stop(self) -> None:
        with self._lock:
            self._stopping.set()
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
        self._thread.join(5)


def _separate_producer(settings: Settings) -> bool:
    return settings.uses_redis and settings.producer == "on"


def raise_fd_limit() -> None:
    """Open-file soft limit up to the hard one: every connection is a descriptor, and one
    on the fan-out's fast path holds a second (app/prices/lanes.py)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            logger.warning("open-file limit stays %d (raising it to %d: %s)", soft, target, exc)
            return
        soft = target
    logger.info("open-file limit: %d", soft)


def check_connection_cap(settings: Settings) -> None:
    """Warn when MAX_OPEN_CONNECTIONS does not fit under the open-file limit: past that limit,
    connections are left unaccepted, probes too, before any answer or log line."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    cap = settings.open_connection_cap
    if soft != resource.RLIM_INFINITY and cap + _FD_HEADROOM > soft:
        logger.warning(
            "MAX_OPEN_CONNECTIONS (%d) + %d for everything else exceeds the open-file limit "
            "(%d): at the limit connections are left unaccepted; lower it or raise the limit",
            cap,
            _FD_HEADROOM,
            soft,
        )


def _stop_before_dying_of(signum: int, producer: ProducerProcess) -> None:
    """Once uvicorn has shut down after a signal, it raises that signal again for the handler
    it found; for SIGTERM that was the default, which ends the process on the spot, before
    main()'s `finally` could stop the producer (a SIGINT raises KeyboardInterrupt: it gets
    there). So stop the producer first, then die of the signal, as a supervisor expects."""

    def stop_then_die(received: int, frame: FrameType | None) -> None:
        producer.stop()
        signal.signal(received, signal.SIG_DFL)
        signal.raise_signal(received)

    signal.signal(signum, stop_then_die)


def main() -> None:
    settings = get_settings()
    logging.config.dictConfig(logging_config(settings.log_level))
    if settings.producer == "on":  # whether in this process or in one of its own
        exit_unless_source_ready(settings)
    raise_fd_limit()
    check_connection_cap(settings)
    serving = guard.resolve(settings)
    if serving.fell_back:
        # The workers (this process too, importing app.main) read the settings again: they
        # start on the stock protocol without checking (and warning) once more each.
        os.environ["WS_IMPL"] = serving.settings.ws_impl
        os.environ["FANOUT_DIRECT_WRITES"] = "false"
        get_settings.cache_clear()
    producer: ProducerProcess | None = None
    if _separate_producer(settings):
        # One name for the workers and their producer: /readyz reports whether it leads.
        os.environ["INSTANCE_ID"] = instance_name(settings)
        os.environ["PRODUCER"] = "off"
        get_settings.cache_clear()
        producer = ProducerProcess()
        _stop_before_dying_of(signal.SIGTERM, producer)
        producer.start()
    try:
        uvicorn.run(
            "app.main:app",
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            ws=serving.ws,
            http=serving.http,
            loop=settings.event_loop,
            ws_max_size=settings.ws_max_message_bytes,
            ws_per_message_deflate=settings.ws_per_message_deflate,
            limit_concurrency=settings.open_connection_cap,  # the stock protocols' cap
            log_config=logging_config(settings.log_level),
            log_level=settings.log_level,
            proxy_headers=True,
            lifespan="on",
            timeout_graceful_shutdown=10,
        )
    finally:
        if producer is not None:
            producer.stop()
