"""Test helpers: settings, databases, Redis servers, in-process and subprocess servers,
tokens, and a small WebSocket client."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from fastapi import FastAPI
from redis import Redis as SyncRedis
from redis.exceptions import NoPermissionError, RedisError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from app.config import Settings
from app.security import TokenSigner
from app.server import guard
from tests import frames

ROOT = Path(__file__).resolve().parent.parent


def _seeded_symbols() -> list[str]:
    """The instruments the first migration seeds, in its order (read from the migration)."""
    path = ROOT / "alembic" / "versions" / "0001_initial.py"
    spec = importlib.util.spec_from_file_location("pricefeed_migration_0001", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [row[0] for row in module.SEED_INSTRUMENTS]


SEED_SYMBOLS = _seeded_symbols()
JWT_SECRET = "test-secret-test-secret-test-secret-0123"
TEST_ENV = {
    "ENV": "dev",
    "JWT_SECRET": JWT_SECRET,
    "JWT_LEEWAY_SECONDS": "0",
    "FEED_TICKS_PER_SECOND": "20",
    "FEED_SEED": "7",
    "LOG_LEVEL": "info",
    "LEADER_LEASE_MS": "1500",
}


# The tests' servers listen on ports below the kernel's ephemeral range (32768 and up on
# Linux), which hands out the source ports of client connections. Each pytest-xdist worker
# has a block of its own, walked in order from a random start: two workers never pick the same
# port, and a port a test lets go (a redis-server it kills to restart on the same port) is not
# handed to another server meanwhile, as the kernel's `bind(("127.0.0.1", 0))` might.
PORT_BLOCK = 3000
PORT_BLOCKS_FROM = 20000  # four blocks: 20000-31999
_next_port = itertools.count(random.randrange(PORT_BLOCK))


def free_port() -> int:
    """A port nothing on 127.0.0.1 listens on now, from this worker's block."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    base = PORT_BLOCKS_FROM + (worker % 4) * PORT_BLOCK
    for _ in range(PORT_BLOCK):
        port = base + next(_next_port) % PORT_BLOCK
        with socket.socket() as sock, contextlib.suppress(OSError):
            sock.bind(("127.0.0.1", port))
            return port
    raise RuntimeError(f"no free port in {base}-{base + PORT_BLOCK - 1}")


def make_settings(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {k.lower(): v for k, v in TEST_ENV.items()}
    values.update(database_url=database_url, broadcast_url="memory://")
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def signer(audience: str = "pricefeed", secret: str = JWT_SECRET) -> TokenSigner:
    return TokenSigner(secret=secret, audience=audience, ttl_seconds=300, leeway_seconds=0)


def token(
    subject: str = "tester",
    symbols: list[str] | None = None,
    ttl: int = 300,
    scopes: tuple[str, ...] = (),
) -> str:
    return signer().issue(subject=subject, symbols=symbols or ["*"], scopes=scopes, ttl_seconds=ttl)


def migrate(database_url: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "alembic", "-x", f"url={database_url}", "upgrade", "head"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )


@contextlib.asynccontextmanager
async def sqlite_locked(path: str) -> AsyncIterator[None]:
    """Another process's exclusive lock on the SQLite file: every write (and read) is refused
    with `database is locked` until it ends. Taken in a thread: a write in flight holds its
    lock until this event loop (which may run the server) moves it on, so waiting on the loop
    itself would wait out the busy timeout instead (a deadlock, not an outage)."""

    def lock() -> sqlite3.Connection:
        holder = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
        holder.execute("BEGIN EXCLUSIVE")
        return holder

    holder = await asyncio.to_thread(lock)
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()


# ---------------------------------------------------------------- in-process servers

# The servers a stream test runs against, as uvicorn's own tests run over every protocol class
# (the `live` fixture reads both values): pricefeed's protocol (WS_IMPL=fast) with the hub's
# direct socket writes on and off, and uvicorn's stock websockets-sansio protocol (what the
# version guard falls back to). The stock protocol offers no frame writer, so every frame is an
# ASGI send and FANOUT_DIRECT_WRITES has nothing to act on: on and off are the same run there.
#
# Where the version guard would not run pricefeed's protocol (the canary's newest releases may
# lie outside its tested range), what tests that protocol alone skips: the service falls back
# to the stock one, which the `stock` variant and the serve tests still prove.
if os.environ.get("PRICEFEED_TRY_UNTESTED_RELEASES") == "1":
    # The canary's question: would pricefeed's protocol still work on releases past the tested
    # range? Here only, the guard admits any release (the service itself never does).
    guard.TESTED = tuple(guard.Tested(t.package, t.minimum, "9999") for t in guard.TESTED)
FAST_UNAVAILABLE = guard.fast_protocol() is None
NEEDS_FAST = pytest.mark.skipif(
    FAST_UNAVAILABLE,
    reason="pricefeed's protocol is not admitted here (app/server/guard.py): the service "
    "serves through the stock protocol",
)
SERVER_VARIANTS = pytest.mark.parametrize(
    ("ws_impl", "fanout_direct_writes"),
    [
        pytest.param("fast", True, id="fast-direct-on", marks=NEEDS_FAST),
        pytest.param("fast", False, id="fast-direct-off", marks=NEEDS_FAST),
        pytest.param("websockets-sansio", False, id="stock"),
    ],
)
# For what only pricefeed's protocol does: its two variants.
FAST_VARIANTS = pytest.mark.parametrize(
    "fanout_direct_writes",
    [
        pytest.param(True, id="fast-direct-on", marks=NEEDS_FAST),
        pytest.param(False, id="fast-direct-off", marks=NEEDS_FAST),
    ],
)


@dataclass
class LiveApp:
    app: FastAPI
    port: int

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def serve_in_process(app: FastAPI, **config: Any) -> AsyncIterator[LiveApp]:
    """uvicorn on a free port in this event loop: a real server for WebSocket tests."""
    port = free_port()
    settings: Settings = app.state.settings
    serving = guard.resolve(settings)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            ws=serving.ws,
            http=serving.http,
            ws_max_size=settings.ws_max_message_bytes,
            ws_per_message_deflate=settings.ws_per_message_deflate,
            limit_concurrency=settings.open_connection_cap,  # the stock protocols' cap
            log_level="warning",
            lifespan="on",
            **config,
        )
    )
    task = asyncio.create_task(server.serve())
    try:
        deadline = time.monotonic() + 15
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("server stopped during startup")
            if time.monotonic() > deadline:
                raise TimeoutError("server did not start")
            await asyncio.sleep(0.02)
        yield LiveApp(app=app, port=port)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


# ---------------------------------------------------------------- Redis


@dataclass
class RedisServer:
    port: int
    directory: str
    process: subprocess.Popen[bytes] | None = None
    args: tuple[str, ...] = ()  # more redis-server options, e.g. ("--requirepass", "s3cret")
    password: str | None = None  # what PING must authenticate with to see it up ("user pass")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.directory,
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                raise RuntimeError(f"redis-server exited: is port {self.port} taken?")
            if self._answers():
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError("redis-server did not start")

    def _answers(self) -> bool:
        """Whether this redis-server answers on its port: not another one that holds it."""
        assert self.process is not None
        username, _, password = (self.password or "").rpartition(" ")  # "user pass": ACL AUTH
        client = SyncRedis(
            host="127.0.0.1",
            port=self.port,
            username=username or None,
            password=password or None,
            socket_connect_timeout=0.2,
            socket_timeout=1,
        )
        try:
            client.ping()
            try:
                return bool(client.info("server")["process_id"] == self.process.pid)
            except NoPermissionError:  # an ACL that denies INFO: the PONG is all there is
                return True
        except RedisError:
            return False
        finally:
            client.close()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def freeze(self) -> None:
        """Stop the process without closing its sockets: a Redis that hangs, or a network
        that drops packets silently."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


@contextlib.contextmanager
def redis_server(
    *, password: str | None = None, args: tuple[str, ...] = ()
) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server is not installed (make test installs it)")
    directory = tempfile.mkdtemp(prefix="pricefeed-redis-")
    server = RedisServer(
        port=free_port(),
        directory=directory,
        args=(*args, "--requirepass", password) if password else args,
        password=password,
    )
    server.start()
    try:
        yield server
    finally:
        server.kill()
        shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------- subprocess servers


@dataclass
class ServerProcess:
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    own_group: bool = False  # a process group of its own, for signal_group()
    _log: Any = field(default=None, repr=False)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app"],
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=self.own_group,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def send_signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def signal_group(self, sig: int) -> None:
        """`sig` to every process of its group, as a terminal's Ctrl+C or `kill -- -pgid`."""
        assert self.process is not None and self.own_group
        os.killpg(self.process.pid, sig)

    def stop(self, sig: int = int(signal.SIGTERM), timeout: float = 15) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    async def wait_ready(self, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited:\n{self.log()[-3000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    response = await client.get(f"{self.http}/readyz", timeout=2)
                    if response.status_code == 200:
                        body: dict[str, Any] = response.json()
                        return body
                await asyncio.sleep(0.1)
        raise TimeoutError(f"server not ready:\n{self.log()[-3000:]}")


@contextlib.contextmanager
def running(*servers: ServerProcess, sig: int = int(signal.SIGKILL)) -> Iterator[None]:
    """Start `servers`; stop each with `sig` however the block ends (SIGKILL by default:
    nothing of a test's cluster outlives it, and nothing is left for a graceful exit)."""
    try:
        for server in servers:
            server.start()
        yield
    finally:
        for server in servers:
            server.stop(sig)


def server_process(tmp: Path, name: str, database_url: str, **env: str) -> ServerProcess:
    port = free_port()
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PRICEFEED_",))},
        **TEST_ENV,
        "DATABASE_URL": database_url,
        "BROADCAST_URL": "memory://",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "INSTANCE_ID": name,
        **env,
    }
    return ServerProcess(port=port, env=full_env, log_path=tmp / f"{name}.log")


# ---------------------------------------------------------------- WebSocket client


class Stream:
    """A WebSocket client that reads JSON frames (objects or batch arrays, flattened)."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self._pending: list[dict[str, Any]] = []

    async def send(self, message: dict[str, Any] | str) -> None:
        await self.conn.send(
            message if isinstance(message, str) else orjson.dumps(message).decode()
        )

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        if not self._pending:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancel that lands
            # as a frame arrives (CPython gh-86296), and a background reader told to stop
            # then reads on until its stream closes (a 300 s token's expiry, in one CI run).
            async with asyncio.timeout(timeout):
                raw = await self.conn.recv()
            body = orjson.loads(raw)
            frames.record(
                frames.channel_of(self.conn.request.path if self.conn.request else ""), body
            )
            self._pending = body if isinstance(body, list) else [body]
        return self._pending.pop(0)

    async def recv_type(self, *types: str, timeout: float = 5.0) -> dict[str, Any]:
        """The next frame of one of `types`, skipping heartbeats and others."""
        deadline = time.monotonic() + timeout
        while True:
            frame = await self.recv(max(deadline - time.monotonic(), 0.01))
            if frame["type"] in types:
                return frame

    async def closed_with(self, timeout: float = 5.0) -> tuple[int | None, list[dict[str, Any]]]:
        """Read until the server closes; the close code and the frames received meanwhile."""
        frames: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                frames.append(await self.recv(max(deadline - time.monotonic(), 0.01)))
        except ConnectionClosed:
            pass
        return self.conn.close_code, frames


@contextlib.asynccontextmanager
async def open_stream(url: str, **kwargs: Any) -> AsyncIterator[Stream]:
    # The client keeps reading while the test looks away, so its close handshake is not
    # stuck behind unread ticks (websockets stops reading when its queue is full).
    kwargs.setdefault("max_queue", None)
    async with connect(url, open_timeout=5, **kwargs) as conn:
        yield Stream(conn)


async def scrape_sample(server: LiveApp, sample: str) -> float:
    """The value of one sample (`name{labels}` as /metrics writes it) on a live server; 0 while
    it has not been counted yet."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{server.http}/metrics")).text
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


class FakeClock:
    """The source's clock and sleep: a sleep moves time on at once, and is recorded."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)
