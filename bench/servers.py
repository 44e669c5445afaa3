"""The servers the benchmark compares: how to start each, its client protocol and publisher."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import SERVER_CORE, http_get, kill, spawn, wait_http_ok

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
NODE_DIR = BENCH / "peers" / "node"
BUILD = BENCH / ".build"  # compiled C programs (the load generator, the C peer); ignored by git
JWT_SECRET = "bench-secret-bench-secret-bench-secret"
C_FLAGS = ["-O2", "-std=c11", "-Wall", "-Wextra"]


def c_compiler() -> str | None:
    return shutil.which("gcc") or shutil.which("cc")


def build_c(source: Path, binary: Path) -> Path:
    """Compile the single-file C program `source` into `binary` (C_FLAGS) unless `binary` is
    newer than the source; written to a temporary name first, so a reader never sees half a
    binary."""
    if binary.exists() and binary.stat().st_mtime >= source.stat().st_mtime:
        return binary
    cc = c_compiler()
    if cc is None:
        raise RuntimeError("no C compiler (gcc or cc) on PATH")
    binary.parent.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_name(f"{binary.name}.tmp{os.getpid()}")
    cmd = [cc, *C_FLAGS, "-o", str(tmp), str(source)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    tmp.replace(binary)
    return binary


def _seeded_symbols() -> list[str]:
    """The instruments pricefeed's first migration seeds, in its order."""
    path = REPO / "alembic" / "versions" / "0001_initial.py"
    spec = importlib.util.spec_from_file_location("pricefeed_migration_0001", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [row[0] for row in module.SEED_INSTRUMENTS]


PRICEFEED_SYMBOLS = _seeded_symbols()


def bench_symbols(count: int) -> list[str]:
    """`count` symbols: the seeded ones first, then `X10-USD`, `X11-USD`… (added to
    pricefeed's database by `Server.prepare`): a real feed's dozens of instruments, where each
    tick reaches fewer subscribers and a read's fixed cost weighs more per message."""
    extra = [f"X{i:02d}-USD" for i in range(len(PRICEFEED_SYMBOLS), count)]
    return PRICEFEED_SYMBOLS[:count] + extra


def add_instruments(db: Path, symbols: list[str]) -> None:
    """Add the symbols the seed does not have to a freshly migrated pricefeed database."""
    import sqlite3

    extra = [s for s in symbols if s not in PRICEFEED_SYMBOLS]
    if not extra:
        return
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.executemany(
            "INSERT INTO instruments (symbol, name, asset_class, price_decimals, "
            "reference_price, active) VALUES (?, ?, 'crypto', 4, '100.0000', 1)",
            [(s, f"bench instrument {s}") for s in extra],
        )


@dataclass
class Server:
    name: str
    client_kind: str  # loadgen --kind
    # "publish" / "sio" (bench/producer.py), "node" (peers/node/producer.js), or "own": the
    # product's own producer (PRODUCER=on, the simulated feed), no publisher of the bench's
    producer: str
    health_path: str
    batch: bool = False  # pricefeed: clients opt in to array frames
    workers: int = 1
    about: str = ""
    env: dict[str, str] = field(default_factory=dict)
    # The worker-scaling pair: each worker capped at this many cores (bench/cpuquota.py).
    # Such a server runs only the `scale` scenario, and only such servers run it.
    worker_cores: float | None = None
    # A C peer: its source under bench/, built into bench/.build/<stem> by `start`.
    c_source: str | None = None
    # pricefeed: the checkout it runs from (`pricefeed-base`: BENCH_BASE_TREE, another commit).
    tree: Path | None = REPO

    def unavailable(self) -> str | None:
        """Why this server cannot run here, or None."""
        if self.producer == "node" and not shutil.which("node"):
            return "node not found"
        if self.c_source is not None and c_compiler() is None:
            return "no C compiler (gcc or cc) on PATH"
        if self.worker_cores is not None:
            from bench import cpuquota

            why = cpuquota.available()
            if why:
                return why
        if self.client_kind == "pricefeed":
            if self.tree is None:
                return (
                    "BENCH_BASE_TREE is not set (a checkout of the commit to compare: "
                    "git worktree add /tmp/base HEAD~1, then make -C /tmp/base install)"
                )
            if not (self.tree / "app" / "__main__.py").exists():
                return f"{self.tree}/app/__main__.py does not exist"
        return None

    async def prepare(
        self, *, port: int, redis_url: str, workdir: Path, log: Path, symbols: list[str]
    ) -> None:
        """One-off work before start (pricefeed: the schema, and the instruments the seed
        does not have)."""
        if self.client_kind != "pricefeed":
            return
        env = self.pricefeed_env(port=port, redis_url=redis_url, workdir=workdir)

        def migrate() -> int:
            with open(log, "ab") as out:
                return subprocess.run(
                    [sys.executable, "-m", "alembic", "upgrade", "head"],
                    cwd=self.tree,
                    env=env,
                    stdout=out,
                    stderr=out,
                    timeout=120,
                ).returncode

        rc = await asyncio.to_thread(migrate)
        if rc != 0:
            raise RuntimeError(f"alembic upgrade head failed ({rc}), see {log}")
        add_instruments(workdir / "bench.db", symbols)
        if self.workers > 1:
            # With ENV=dev every worker upserts the demo client at startup; on a fresh
            # database two workers raced (UNIQUE constraint failed: api_clients.client_id) in
            # early versions, one died and uvicorn stopped the rest. One single-worker start
            # seeds it first, so the benchmark does not depend on that race being handled.
            seed = spawn(
                [sys.executable, "-m", "app"],
                core=SERVER_CORE,
                env={**env, "WORKERS": "1"},
                cwd=self.tree,
                log=log,
            )
            try:
                await wait_http_ok(port, self.health_path, seed, timeout=60)
            finally:
                kill(seed)

    def pricefeed_env(self, *, port: int, redis_url: str, workdir: Path) -> dict[str, str]:
        import os

        return {
            **os.environ,
            "PORT": str(port),
            "HOST": "127.0.0.1",
            "BROADCAST_URL": redis_url,
            "PRODUCER": "off",
            "ENV": "dev",
            "JWT_SECRET": JWT_SECRET,
            "DATABASE_URL": f"sqlite+aiosqlite:///{workdir}/bench.db",
            "WORKERS": str(self.workers),
            "LOG_LEVEL": "warning",
            **self.env,
        }

    def start(
        self,
        *,
        port: int,
        redis_url: str,
        workdir: Path,
        log: Path,
        ticks_per_symbol: float | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start the server; `ticks_per_symbol`: the rate of its own feed (producer "own")."""
        if self.client_kind == "pricefeed":
            env = self.pricefeed_env(port=port, redis_url=redis_url, workdir=workdir)
            if self.producer == "own" and ticks_per_symbol is not None:
                env["FEED_TICKS_PER_SECOND"] = f"{ticks_per_symbol:g}"
            # Run from its tree: `python -m` puts the working directory first on sys.path, so
            # that tree's `app` package is the one imported.
            return spawn(
                [sys.executable, "-m", "app"], core=SERVER_CORE, env=env, cwd=self.tree, log=log
            )
        env = {"BROADCAST_URL": redis_url, "PORT": str(port), "HOST": "127.0.0.1", **self.env}
        if self.c_source is not None:
            source = BENCH / self.c_source
            binary = build_c(source, BUILD / source.stem)  # a no-op once built
            return spawn([str(binary)], core=SERVER_CORE, env=env, cwd=REPO, log=log)
        if self.producer == "node":
            return spawn(["node", "server.js"], core=SERVER_CORE, env=env, cwd=NODE_DIR, log=log)
        module = {
            "broadcaster": "bench.peers.broadcaster_readme:app",
            "sio": "bench.peers.socketio_py:app",
        }[self.client_kind]
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            module,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ]
        return spawn(cmd, core=SERVER_CORE, env=env, cwd=REPO, log=log)

    def producer_cmd(
        self, *, redis_url: str, symbols: list[str], rate: float, publish: str = "burst"
    ) -> tuple[list[str], Path]:
        """The publisher's command line and working directory; `publish`: burst or even
        (bench/producer.py's docstring)."""
        syms = ",".join(symbols)
        if self.producer == "node":
            return (
                [
                    "node",
                    "producer.js",
                    "--redis-url",
                    redis_url,
                    "--symbols",
                    syms,
                    "--rate",
                    str(rate),
                    "--publish",
                    publish,
                ],
                NODE_DIR,
            )
        return (
            [
                sys.executable,
                "-m",
                "bench.producer",
                "--mode",
                self.producer,
                "--redis-url",
                redis_url,
                "--symbols",
                syms,
                "--rate",
                str(rate),
                "--publish",
                publish,
            ],
            REPO,
        )

    async def conflations(self, port: int) -> float | None:
        """pricefeed: sum of its /metrics samples named *conflat* (None when it has none)."""
        if self.client_kind != "pricefeed":
            return None
        try:
            status, body = await http_get(port, "/metrics", timeout=10.0)
        except (OSError, ValueError, IndexError, TimeoutError):
            return None
        if status != 200:
            return None
        total, seen = 0.0, False
        for line in body.decode(errors="replace").splitlines():
            if line.startswith("#") or "conflat" not in line.split("{")[0].split(" ")[0]:
                continue
            name = line.split("{")[0].split(" ")[0]
            if name.endswith("_created"):
                continue
            try:
                total += float(line.rsplit(" ", 1)[1])
                seen = True
            except ValueError:
                pass
        return total if seen else None


SERVERS: dict[str, Server] = {
    s.name: s
    for s in [
        Server(
            "c-floor",
            "broadcaster",
            "publish",
            "/",
            c_source="peers/floor.c",
            about="C + epoll, one send() per message per client, nothing else: "
            "this host's kernel floor",
        ),
        Server(
            "pricefeed",
            "pricefeed",
            "publish",
            "/readyz",
            about="python -m app, WORKERS=1, object frames",
        ),
        Server(
            "pricefeed-own",
            "pricefeed",
            "own",
            "/readyz",
            env={"PRODUCER": "on", "FEED_SOURCE": "simulated"},
            about="python -m app, WORKERS=1, with its own producer (python -m app.feed, the "
            "simulated feed at the scenario's rate) in its process tree, on the server core",
        ),
        Server(
            "pricefeed-own-nohist",
            "pricefeed",
            "own",
            "/readyz",
            env={"PRODUCER": "on", "FEED_SOURCE": "simulated", "HISTORY_DAYS": "0"},
            about="pricefeed-own with no history in the database (HISTORY_DAYS=0): beside "
            "pricefeed-own, what writing every tick and candle to the database costs",
        ),
        Server(
            "pricefeed-own-base",
            "pricefeed",
            "own",
            "/readyz",
            env={"PRODUCER": "on", "FEED_SOURCE": "simulated"},
            tree=Path(os.environ["BENCH_BASE_TREE"]) if os.environ.get("BENCH_BASE_TREE") else None,
            about="pricefeed-own from BENCH_BASE_TREE (another commit), side by side with this one",
        ),
        Server(
            "pricefeed-base",
            "pricefeed",
            "publish",
            "/readyz",
            tree=Path(os.environ["BENCH_BASE_TREE"]) if os.environ.get("BENCH_BASE_TREE") else None,
            about="python -m app from BENCH_BASE_TREE (another commit), side by side with this one",
        ),
        Server(
            "pricefeed-batch",
            "pricefeed",
            "publish",
            "/readyz",
            batch=True,
            about="python -m app, WORKERS=1, clients subscribe with batch=true",
        ),
        Server(
            "pricefeed-w2",
            "pricefeed",
            "publish",
            "/readyz",
            workers=2,
            about="python -m app, WORKERS=2 (both on the server core)",
        ),
        Server(
            "pricefeed-1q",
            "pricefeed",
            "publish",
            "/readyz",
            worker_cores=0.25,
            about="python -m app, WORKERS=1, the worker capped at 0.25 of the server core",
        ),
        Server(
            "pricefeed-w2q",
            "pricefeed",
            "publish",
            "/readyz",
            workers=2,
            worker_cores=0.25,
            about="python -m app, WORKERS=2, each worker capped at 0.25 of the server core",
        ),
        Server(
            "pricefeed-pyloop",
            "pricefeed",
            "publish",
            "/readyz",
            env={"FANOUT_DIRECT_WRITES": "false"},
            about="python -m app, lanes written through their transports in Python (no C loop)",
        ),
        Server(
            "pricefeed-sansio",
            "pricefeed",
            "publish",
            "/readyz",
            env={"WS_IMPL": "websockets-sansio"},
            about="python -m app, uvicorn's websockets-sansio without the direct frame path",
        ),
        Server(
            "pricefeed-wsproto",
            "pricefeed",
            "publish",
            "/readyz",
            env={"WS_IMPL": "wsproto"},
            about="python -m app, uvicorn's wsproto implementation",
        ),
        Server(
            "pricefeed-asyncio",
            "pricefeed",
            "publish",
            "/readyz",
            env={"EVENT_LOOP": "asyncio"},
            about="python -m app, the stock asyncio event loop instead of uvloop",
        ),
        Server(
            "broadcaster-readme",
            "broadcaster",
            "publish",
            "/",
            about="broadcaster README pattern on FastAPI under uvicorn",
        ),
        Server(
            "python-socketio",
            "sio",
            "sio",
            "/socket.io/?EIO=4&transport=polling",
            about="python-socketio AsyncServer + AsyncRedisManager, ASGI under uvicorn",
        ),
        Server(
            "node-socketio",
            "sio",
            "node",
            "/healthz",
            about="socket.io + @socket.io/redis-adapter, @socket.io/redis-emitter publisher",
        ),
    ]
}

DEFAULT_SERVERS = [
    "c-floor",
    "pricefeed",
    "pricefeed-batch",
    "broadcaster-readme",
    "python-socketio",
    "node-socketio",
    "pricefeed-1q",
    "pricefeed-w2q",
]
QUICK_SERVERS = [
    "c-floor",
    "pricefeed",
    "broadcaster-readme",
    "python-socketio",
    "node-socketio",
    "pricefeed-1q",
    "pricefeed-w2q",
]


def ensure_node_modules(log: Path) -> str | None:
    """npm install in peers/node when node_modules is missing; the reason on failure."""
    if (NODE_DIR / "node_modules" / "socket.io").exists():
        return None
    if not shutil.which("npm"):
        return "npm not found"
    with open(log, "ab") as out:
        try:
            rc = subprocess.run(
                ["npm", "install", "--no-audit", "--no-fund"],
                cwd=NODE_DIR,
                stdout=out,
                stderr=out,
                timeout=300,
            ).returncode
        except subprocess.TimeoutExpired:
            return "npm install timed out"
    return None if rc == 0 else f"npm install failed ({rc}), see {log}"
