"""The producer alone: ticks/s and CPU per tick of `python -m app.feed` against a real Redis.

What a tick costs the one producer of a cluster before any fan-out: the source's quote, the
stamp (`seq`, `ts`, the frame), the fenced store write (one Lua call a batch), the candles
and the publish (one more), and the loop's own overhead, with nobody subscribed. Each load
runs a fresh `redis-server` and a fresh `python -m app.feed` from each tree (`pricefeed`: this
checkout; `pricefeed-base`: `BENCH_BASE_TREE`, another commit, as in `python -m bench`),
alternated, so a noisy minute hits both:

- `NxR`: the simulated source (the default feed), N symbols at R ticks/s each
  (`10x50` = 500 ticks/s; `50x20` = S1's 1,000 ticks/s).
- `max`: a replay of a generated file at FEED_REPLAY_SPEED=0 (as fast as the producer takes
  it; looped, 100 symbols): what one core sustains. Its per-tick cost includes reading and
  checking the CSV row, as the simulated one includes the random walk.

Ticks are counted from the store (the sum of every symbol's latest `seq` in Redis), CPU from
`/proc` (the producer process only; Redis is shown beside it). Pinning as in `python -m
bench`: the producer on core 0, Redis and this runner on core 1. A kind ending in `-nohist`
(`pricefeed-nohist`, `pricefeed-base-nohist`) runs the same producer with HISTORY_DAYS=0:
beside the kind itself, what writing every tick and candle to the database costs. A kind
ending in `-pg` (`pricefeed-pg`, `pricefeed-base-pg`) writes history to PostgreSQL instead of
SQLite: a fresh database per run on `--pg` (its server's CPU is not the producer's, and is
not counted).

    python -m bench.feedcost                                  # 10x50,50x20,max; 2 rounds
    BENCH_BASE_TREE=/tmp/base python -m bench.feedcost --kinds pricefeed-base,pricefeed
    python -m bench.feedcost --kinds pricefeed-nohist,pricefeed --loads 50x20
    python -m bench.feedcost --loads max --seconds 20 --rounds 1
    python -m bench.feedcost --kinds pricefeed-pg,pricefeed --loads max
    python -m bench.feedcost --kinds pricefeed-base,pricefeed --loads 50x20 --paired

`--paired` runs the kinds at the same time rather than one after another: on a shared machine
a fixed load's CPU per tick moves by ±15 % between takes of one tree, and side by side both
takes see the same disturbance (at 13 % of a core each, they barely meet on the core).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from redis.asyncio import Redis as RedisClient

from bench import procs, report
from bench.procs import SERVER_CORE, Redis, free_port, kill, spawn
from bench.servers import SERVERS, bench_symbols

PREFIX = "pricefeed"  # REDIS_KEY_PREFIX's default
MAX_SYMBOLS = 100
REPLAY_ROWS = 200_000


def parse_load(text: str) -> tuple[int, float | None]:
    """`NxR` → (N symbols, R ticks/s each); `max` → (MAX_SYMBOLS, None)."""
    if text == "max":
        return MAX_SYMBOLS, None
    symbols, rate = text.lower().split("x")
    return int(symbols), float(rate)


def write_replay(path: Path, symbols: list[str]) -> None:
    """REPLAY_ROWS rows round-robin over `symbols`, 1 ms apart, prices with 2 decimals (every
    instrument takes at least 2), a random walk from 100."""
    walk = random.Random(7)
    prices = dict.fromkeys(symbols, 100.0)
    lines = ["ts,symbol,price,volume\n"]
    t0 = 1_764_300_000_000
    for i in range(REPLAY_ROWS):
        symbol = symbols[i % len(symbols)]
        prices[symbol] = max(1.0, prices[symbol] * (1 + walk.gauss(0, 1e-4)))
        lines.append(f"{t0 + i},{symbol},{prices[symbol]:.2f},{walk.randint(1, 500)}\n")
    path.write_text("".join(lines))


async def seq_total(redis: RedisClient) -> tuple[int, int]:
    """(symbols in the store, the sum of their latest seq): every tick stored, across runs."""
    import orjson

    latest = await redis.hgetall(f"{PREFIX}:latest")
    return len(latest), sum(orjson.loads(frame)["seq"] for frame in latest.values())


NOHIST = "-nohist"  # a kind's suffix: the same producer with HISTORY_DAYS=0
PG = "-pg"  # a kind's suffix: the same producer with its database on PostgreSQL


def server_of(kind: str) -> str:
    """The server `kind` runs (`pricefeed-nohist`: `pricefeed`, with no history)."""
    return kind.removesuffix(NOHIST).removesuffix(PG)


@asynccontextmanager
async def postgres_database(
    admin_dsn: str, *, tree: Path, log: Path, symbols: list[str]
) -> AsyncIterator[str]:
    """A fresh database on the PostgreSQL server of `admin_dsn`, migrated by `tree`'s Alembic,
    with the instruments `symbols` needs; its SQLAlchemy URL. Dropped afterwards."""
    import asyncpg

    from bench.servers import PRICEFEED_SYMBOLS

    admin = await asyncpg.connect(admin_dsn)
    name = f"pricefeed_feedcost_{uuid.uuid4().hex[:10]}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        host = admin_dsn.split("://", 1)[1].rsplit("/", 1)[0]
        url = f"postgresql+asyncpg://{host}/{name}"

        def migrate() -> int:
            with open(log, "ab") as out:
                return subprocess.run(
                    [sys.executable, "-m", "alembic", "-x", f"url={url}", "upgrade", "head"],
                    cwd=tree,
                    stdout=out,
                    stderr=out,
                    timeout=120,
                ).returncode

        if rc := await asyncio.to_thread(migrate):
            raise RuntimeError(f"alembic upgrade head failed ({rc}), see {log}")
        conn = await asyncpg.connect(admin_dsn.rsplit("/", 1)[0] + f"/{name}")
        try:
            await conn.executemany(
                "INSERT INTO instruments (symbol, name, asset_class, price_decimals, "
                "reference_price, active) VALUES ($1, $2, 'crypto', 4, '100.0000', true)",
                [(s, f"bench instrument {s}") for s in symbols if s not in PRICEFEED_SYMBOLS],
            )
        finally:
            await conn.close()
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def measure(kind: str, load: str, opts: argparse.Namespace) -> dict[str, Any]:
    spec = SERVERS[server_of(kind)]
    count, _ = parse_load(load)
    workdir = Path(tempfile.mkdtemp(prefix=f"feedcost-{kind}-"))
    symbols = bench_symbols(count) if count <= 64 else _many_symbols(count)
    log = workdir / "producer.log"
    if not kind.endswith(PG):
        return await _measure(kind, load, opts, workdir=workdir, symbols=symbols)
    async with postgres_database(opts.pg, tree=spec.tree, log=log, symbols=symbols) as url:
        return await _measure(kind, load, opts, workdir=workdir, symbols=symbols, database=url)


async def _measure(
    kind: str,
    load: str,
    opts: argparse.Namespace,
    *,
    workdir: Path,
    symbols: list[str],
    database: str | None = None,
) -> dict[str, Any]:
    spec = SERVERS[server_of(kind)]
    count, rate = parse_load(load)
    redis = producer = None
    client: RedisClient | None = None
    try:
        redis = Redis(workdir)
        await redis.ready()
        port = free_port()
        log = workdir / "producer.log"
        if database is None:
            await spec.prepare(
                port=port, redis_url=redis.url, workdir=workdir, log=log, symbols=symbols
            )
        env = spec.pricefeed_env(port=port, redis_url=redis.url, workdir=workdir)
        if database is not None:
            env["DATABASE_URL"] = database
        if kind.endswith(NOHIST):
            env["HISTORY_DAYS"] = "0"
        if rate is None:
            replay = workdir / "replay.csv"
            write_replay(replay, symbols)
            env |= {
                "FEED_SOURCE": "replay",
                "FEED_REPLAY_PATH": str(replay),
                "FEED_REPLAY_SPEED": "0",
                "FEED_REPLAY_LOOP": "true",
            }
        else:
            env |= {"FEED_SOURCE": "simulated", "FEED_TICKS_PER_SECOND": f"{rate:g}"}
        producer = spawn(
            [sys.executable, "-m", "app.feed"], core=SERVER_CORE, env=env, cwd=spec.tree, log=log
        )
        client = RedisClient.from_url(redis.url)
        deadline = time.monotonic() + 60
        while (await seq_total(client))[0] < len(symbols):  # leading, every symbol out
            if producer.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind}: producer not publishing: {log.read_text()[-600:]}")
            await asyncio.sleep(0.2)
        await asyncio.sleep(opts.warmup)
        history = not kind.endswith(NOHIST)
        kept0 = await stored_ticks(database, workdir) if history else 0
        cpu0, redis0 = procs.tree_cpu_seconds(producer.pid), procs.tree_cpu_seconds(redis.proc.pid)
        (_, seq0), t0 = await seq_total(client), time.monotonic()
        steal0 = procs.system_cpu()[2]
        await asyncio.sleep(opts.seconds)
        cpu = procs.tree_cpu_seconds(producer.pid) - cpu0
        redis_cpu = procs.tree_cpu_seconds(redis.proc.pid) - redis0
        (_, seq1), span = await seq_total(client), time.monotonic() - t0
        steal = procs.system_cpu()[2] - steal0
        kept = await stored_ticks(database, workdir) - kept0 if history else None
        ticks = seq1 - seq0
        if producer.poll() is not None:
            raise RuntimeError(f"{kind}: producer exited: {log.read_text()[-600:]}")
        return {
            "kind": kind,
            "load": load,
            "asked": None if rate is None else rate * count,
            "ticks_s": ticks / span,
            "cpu_pct": 100 * cpu / span,
            "us_per_tick": cpu * 1e6 / ticks if ticks else None,
            "redis_us_per_tick": redis_cpu * 1e6 / ticks if ticks else None,
            "steal_pct": 100 * steal / span,
            # Into the history's table over the window (a flush, 250 ms, behind the store).
            "kept_s": None if kept is None else kept / span,
        }
    finally:
        if client is not None:
            await client.aclose()
        if producer is not None:
            kill(producer, timeout=3)
        if redis is not None:
            redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def stored_ticks(database: str | None, workdir: Path) -> int:
    """Rows in the history's `ticks` table (SQLite: the bench's file; else PostgreSQL)."""
    if database is None:

        def count() -> int:
            with contextlib.closing(sqlite3.connect(workdir / "bench.db", timeout=10)) as conn:
                return int(conn.execute("SELECT count(*) FROM ticks").fetchone()[0])

        return await asyncio.to_thread(count)
    import asyncpg

    conn = await asyncpg.connect(database.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        return int(await conn.fetchval("SELECT count(*) FROM ticks"))
    finally:
        await conn.close()


def _many_symbols(count: int) -> list[str]:
    """More symbols than the fan-out bench's 64: the same names, on to `count`."""
    return bench_symbols(64) + [f"X{i:02d}-USD" for i in range(64, count)]


def _cell(values: list[float]) -> str:
    shown = ", ".join(f"{v:,.1f}" if v < 100 else f"{v:,.0f}" for v in values)
    return f"{statistics.median(values):,.1f} ({shown})"


async def amain(opts: argparse.Namespace) -> int:
    kinds = [k for k in opts.kinds.split(",") if k]
    for kind in kinds:
        server = server_of(kind)
        why = SERVERS[server].unavailable() if server in SERVERS else "not a pricefeed server"
        if why:
            print(f"{kind}: {why}", file=sys.stderr)
            return 2
    loads = [x.strip() for x in opts.loads.split(",") if x.strip()]
    if opts.paired and "max" in loads:
        print("--paired: fixed loads only (at full speed the kinds would share a core)")
        return 2
    info = report.machine_info()
    print("## Machine\n")
    for key, val in info.items():
        if key not in ("python-socketio", "node", "socket.io (node)", "websockets"):
            print(f"- {key}: {val}")
    for kind in kinds:
        tree = SERVERS[server_of(kind)].tree
        commit = report._cmd_version(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"])
        print(f"- {kind}: {tree} at {commit}")
    print("- pinning: producer on core 0, redis-server and this runner on core 1\n", flush=True)
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for round_ in range(opts.rounds):
        for load in loads:
            if opts.paired:  # every kind at once, each with its own Redis
                await procs.wait_quiet(opts.quiet_wait)
                taken = await asyncio.gather(*(measure(kind, load, opts) for kind in kinds))
            else:
                taken = []
                for kind in kinds:  # alternated
                    await procs.wait_quiet(opts.quiet_wait)
                    taken.append(await measure(kind, load, opts))
            for row in taken:
                rows.setdefault((load, row["kind"]), []).append(row)
                kept = "-" if row["kept_s"] is None else f"{row['kept_s']:,.0f}"
                print(
                    f"round {round_ + 1} {load:6s} {row['kind']:21s} {row['ticks_s']:9,.0f} "
                    f"ticks/s {row['cpu_pct']:5.1f}% CPU {row['us_per_tick'] or 0:7.1f} µs/tick "
                    f"(redis {row['redis_us_per_tick'] or 0:.1f}, steal {row['steal_pct']:.0f}%, "
                    f"history {kept}/s, load average {os.getloadavg()[0]:.2f})",
                    flush=True,
                )
    print(
        f"\n{opts.seconds:g} s windows after {opts.warmup:g} s; median (each run). CPU: the "
        "producer process only (source, stamp, fenced store, candles, publish, its loop); "
        "redis-server's own CPU beside it.\n"
    )
    print(
        "| load | producer | ticks/s done | asked | CPU % of a core | CPU µs/tick | redis µs/tick "
        "| into history/s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (load, kind), runs in rows.items():
        asked = runs[0]["asked"]
        print(
            f"| {load} | {kind} | {_cell([r['ticks_s'] for r in runs])} "
            f"| {'as fast as taken' if asked is None else f'{asked:,.0f}'} "
            f"| {_cell([r['cpu_pct'] for r in runs])} "
            f"| {_cell([r['us_per_tick'] or 0 for r in runs])} "
            f"| {_cell([r['redis_us_per_tick'] or 0 for r in runs])} "
            f"| {'-' if runs[0]['kept_s'] is None else _cell([r['kept_s'] for r in runs])} |"
        )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.feedcost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--kinds",
        default="pricefeed",
        help="pricefeed, pricefeed-base; -nohist: HISTORY_DAYS=0; -pg: history on PostgreSQL",
    )
    ap.add_argument("--loads", default="10x50,50x20,max", help="NxR (simulated) and/or max")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured window per run")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quiet-wait", type=float, default=10.0)
    ap.add_argument(
        "--pg",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="-pg kinds: a PostgreSQL server (DSN of a database to connect to for CREATE DATABASE)",
    )
    ap.add_argument(
        "--paired",
        action="store_true",
        help="run the kinds at once (same core, a Redis each): what disturbs one disturbs "
        "the other; for fixed loads only (at full speed they would share the core)",
    )
    opts = ap.parse_args()
    return procs.run_main(amain(opts), "feedcost")


if __name__ == "__main__":
    sys.exit(main())
