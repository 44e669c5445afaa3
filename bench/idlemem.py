"""Where an idle connection's memory goes: tracemalloc and `gc` by type, inside the server.

`python -m bench` measures KB per idle connection from outside (RSS). This runs pricefeed
under uvicorn in a child process with tracemalloc on (and the same WebSocket protocol and
settings as `python -m app`), opens 20 warm-up connections, takes a snapshot, opens N more
subscribed, idle connections (`/v1/ws?token=…`, one symbol each, no compression, as the load
generator does), takes a second one, and prints the difference per connection: by file, by
line, and the objects `gc` tracks, by type.

    python -m bench.idlemem                      # 1,000 connections
    python -m bench.idlemem --conns 2000 --settle 35 --frames 3
    BENCH_BASE_TREE=/tmp/base python -m bench.idlemem --tree base

Not pinned and not timed: run it alone, under `flock /tmp/bench.lock`, for stable numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import os
import re
import signal
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
JWT_SECRET = "bench-secret-bench-secret-bench-secret"
WARM = 20


def _serve(port: int, conns: int, frames: int, out: Path) -> None:
    """The child: pricefeed under uvicorn; SIGUSR1 takes the baseline, SIGUSR2 the report."""
    tracemalloc.start(frames)
    import uvicorn

    from app.config import get_settings
    from app.server import guard

    settings = get_settings()
    serving = guard.resolve(settings)
    taken: dict[str, Any] = {}

    def by_type() -> collections.Counter[str]:
        gc.collect()
        return collections.Counter(type(o).__name__ for o in gc.get_objects())

    def baseline() -> None:
        taken["types"], taken["snapshot"] = by_type(), tracemalloc.take_snapshot()

    def report() -> None:
        types, snapshot = by_type(), tracemalloc.take_snapshot()
        lines = []
        by_line = snapshot.compare_to(taken["snapshot"], "lineno")
        total = sum(stat.size_diff for stat in by_line)
        lines.append(f"traced heap: {total / conns:,.0f} B per connection\n\nby file:")
        for stat in snapshot.compare_to(taken["snapshot"], "filename")[:20]:
            lines.append(f"{stat.size_diff / conns:8.0f} B  {_short(stat.traceback[0].filename)}")
        lines.append("\nby line:")
        for stat in by_line[:40]:
            frame = stat.traceback[0]
            lines.append(
                f"{stat.size_diff / conns:8.0f} B {stat.count_diff / conns:6.2f} blocks  "
                f"{_short(frame.filename)}:{frame.lineno}"
            )
        lines.append("\ngc-tracked objects per connection, by type:")
        before = taken["types"]
        per_conn = {name: (types[name] - before.get(name, 0)) / conns for name in types}
        for name, count in sorted(per_conn.items(), key=lambda kv: -kv[1]):
            if count >= 0.5:
                lines.append(f"{count:7.2f} {name}")
        out.write_text("\n".join(lines) + "\n")

    config = uvicorn.Config(
        "app.main:app",
        host="127.0.0.1",
        port=port,
        ws=serving.ws,
        http=serving.http,
        loop=settings.event_loop,
        ws_max_size=settings.ws_max_message_bytes,
        ws_per_message_deflate=settings.ws_per_message_deflate,
        proxy_headers=True,
        lifespan="on",
        log_level="warning",
    )
    server = uvicorn.Server(config)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, baseline)
        loop.add_signal_handler(signal.SIGUSR2, report)
        await server.serve()

    if settings.event_loop == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def _short(filename: str) -> str:
    """Relative to site-packages, the tree, or the standard library."""
    for marker in ("site-packages/", f"{os.getcwd()}/", f"{REPO}/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return re.sub(r"^.*/lib/python3\.\d+/", "", filename)


async def _connect(port: int, first: int, count: int) -> list[Any]:
    import orjson
    import websockets

    from bench.loadgen import make_token

    gate = asyncio.Semaphore(50)

    async def one(i: int) -> Any:
        async with gate:
            token = make_token(i, JWT_SECRET, "pricefeed")
            conn = await websockets.connect(
                f"ws://127.0.0.1:{port}/v1/ws?token={token}",
                compression=None,
                ping_interval=None,
                max_queue=None,
            )
            await conn.send(orjson.dumps({"op": "subscribe", "symbols": ["AAPL"]}).decode())
            reply = orjson.loads(await conn.recv())
            assert reply["type"] == "subscribed", reply
            return conn

    return list(await asyncio.gather(*(one(i) for i in range(first, first + count))))


async def _drive(args: argparse.Namespace) -> int:
    from bench.procs import free_port

    tree = REPO if args.tree == "this" else Path(os.environ["BENCH_BASE_TREE"])
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.txt"
        env = {
            **os.environ,
            "JWT_SECRET": JWT_SECRET,
            "ENV": "dev",
            "PRODUCER": "off",
            "BROADCAST_URL": "memory://",
            "DATABASE_URL": f"sqlite+aiosqlite:///{tmp}/idle.db",
            "LOG_LEVEL": "warning",
            "PYTHONPATH": str(tree),
        }
        subprocess.run(
            [sys.executable, "-m", "alembic", "upgrade", "head"],
            cwd=tree,
            env=env,
            check=True,
            capture_output=True,
        )
        child = subprocess.Popen(  # as a script: `app` is the tree's, not this checkout's
            [sys.executable, __file__, "--serve", str(port)]
            + ["--conns", str(args.conns), "--frames", str(args.frames), "--out", str(out)],
            cwd=tree,
            env=env,
        )
        conns: list[Any] = []
        try:
            await _wait_listening(port, child)
            conns += await _connect(port, 0, WARM)
            await asyncio.sleep(1.0)
            child.send_signal(signal.SIGUSR1)
            await asyncio.sleep(1.5)
            conns += await _connect(port, WARM, args.conns)
            await asyncio.sleep(args.settle)
            child.send_signal(signal.SIGUSR2)
            for _ in range(600):
                if out.exists() and out.stat().st_size:
                    break
                await asyncio.sleep(0.1)
            print(f"{args.conns:,} idle subscribed connections against {WARM} ({tree}):\n")
            print(out.read_text())
        finally:
            await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
            child.terminate()
            child.wait(15)
    return 0


async def _wait_listening(port: int, child: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        if child.poll() is not None:
            raise RuntimeError("the server exited")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        return
    raise TimeoutError("the server did not start")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conns", type=int, default=1000)
    ap.add_argument("--settle", type=float, default=2.0, help="seconds idle before measuring")
    ap.add_argument("--frames", type=int, default=1, help="tracemalloc frames per allocation")
    ap.add_argument("--tree", choices=["this", "base"], default="this")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve is not None:
        _serve(args.serve, args.conns, args.frames, args.out)
        return 0
    return asyncio.run(_drive(args))


if __name__ == "__main__":
    sys.exit(main())
