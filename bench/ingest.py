"""Pushed prices: how many quotes one ingest client pushes through one instance into WebSocket
subscribers, beside the simulated feed at the same rate, in one run.

    python -m bench.ingest [--rate 20000] [--batch 100] [--clients 1] [--seconds 10]

Each row starts a fresh redis-server and `python -m app` with it (so the producer runs in its
own process, `python -m app.feed`, as deployed), the server's process tree pinned to core 0
and this runner on core 1, and `--clients` WebSocket clients subscribed to every symbol.
- `ingest` (FEED_SOURCE=ingest): one HTTP client POSTs `/v1/ingest` batches of `--batch`
  quotes, paced to `--rate` quotes/s with up to `--in-flight` requests outstanding; each quote
  carries its push time in `source_ts`, so push → subscriber latency is `received − source_ts`.
- `simulated` (FEED_SOURCE=simulated): the built-in feed at the same total rate; latency is
  `received − ts` (the producer's stamp), so it starts later than the ingest row's.
Prints quotes/s accepted (202) and delivered per client, refusals (503), latency p50/p99/max,
and the server tree's CPU per quote.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect

from bench.procs import (
    SERVER_CORE,
    Redis,
    free_port,
    kill,
    raise_fd_limit,
    run_main,
    spawn,
    tree_cpu_seconds,
    wait_http_ok,
)
from bench.report import machine_info

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-secret-bench-secret-bench-secret"


def _tokens() -> tuple[str, str]:
    """A reader's token and a publisher's (scope `publish`)."""
    from app.security import TokenSigner

    signer = TokenSigner(secret=SECRET, audience="pricefeed", ttl_seconds=3600, leeway_seconds=5)
    reader = signer.issue(subject="bench-reader", symbols=["*"])
    publisher = signer.issue(subject="bench-feeder", symbols=[], scopes=["publish"])
    return reader, publisher


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Subscribers:
    """WebSocket clients on /v1/ws, each subscribed to every symbol, recording latencies."""

    def __init__(self, *, field: str) -> None:
        self.field = field  # the tick's time to measure from: `source_ts` or `ts`
        self.received = 0
        self.latencies_ms: list[float] = []
        self.recording = False
        self._conns: list[ClientConnection] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def open(self, url: str, count: int, symbols: list[str]) -> None:
        for _ in range(count):
            conn = await connect(url, max_queue=None, ping_interval=None, max_size=None)
            await conn.send(orjson.dumps({"op": "subscribe", "symbols": symbols}).decode())
            self._conns.append(conn)
            self._tasks.append(asyncio.create_task(self._read(conn)))

    async def _read(self, conn: ClientConnection) -> None:
        with contextlib.suppress(Exception):
            async for raw in conn:
                body = orjson.loads(raw)
                if not isinstance(body, dict) or body.get("type") != "tick":
                    continue
                self.received += 1
                stamp = body.get(self.field)
                if self.recording and isinstance(stamp, int):
                    self.latencies_ms.append(time.time() * 1000 - stamp)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*(c.close() for c in self._conns), return_exceptions=True)


class Pusher:
    """One HTTP client pushing batches at a steady rate."""

    def __init__(self, base: str, token: str, symbols: list[str], batch: int) -> None:
        self._http = httpx.AsyncClient(
            base_url=base,
            headers={"Authorization": f"Bearer {token}"},
            limits=httpx.Limits(max_connections=16),
            timeout=10.0,
        )
        self._symbols = symbols
        self._batch = batch
        self._price = {s: 100.0 for s in symbols}
        self._random = random.Random(7)
        self.accepted = 0
        self.refused = 0
        self.failed = 0

    def _quotes(self) -> list[dict[str, Any]]:
        now = int(time.time() * 1000)
        quotes = []
        for i in range(self._batch):
            symbol = self._symbols[i % len(self._symbols)]
            self._price[symbol] = max(1.0, self._price[symbol] * (1 + self._random.gauss(0, 1e-4)))
            quotes.append(
                {"symbol": symbol, "price": f"{self._price[symbol]:.2f}", "source_ts": now}
            )
        return quotes

    async def _push_one(self) -> None:
        try:
            response = await self._http.post("/v1/ingest", json={"quotes": self._quotes()})
        except httpx.HTTPError:
            self.failed += 1
            return
        if response.status_code == 202:
            self.accepted += int(response.json()["accepted"])
        elif response.status_code == 503:
            self.refused += 1
        else:
            self.failed += 1

    async def run(self, rate: float, in_flight: int, stop: asyncio.Event) -> None:
        interval = self._batch / rate
        slots = asyncio.Semaphore(in_flight)
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        pending: set[asyncio.Task[None]] = set()

        async def push() -> None:
            try:
                await self._push_one()
            finally:
                slots.release()

        while not stop.is_set():
            await slots.acquire()
            task = asyncio.create_task(push())
            pending.add(task)
            task.add_done_callback(pending.discard)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))
        await asyncio.gather(*pending, return_exceptions=True)

    async def close(self) -> None:
        await self._http.aclose()


async def _symbols(base: str, token: str, count: int) -> list[str]:
    async with httpx.AsyncClient(base_url=base) as http:
        listed = (
            await http.get("/v1/symbols", headers={"Authorization": f"Bearer {token}"})
        ).json()
    return [row["symbol"] for row in listed][:count]


async def measure(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix=f"pf-ingest-{kind}-"))
    redis = Redis(tmp)
    await redis.ready()
    db = f"sqlite+aiosqlite:///{tmp}/bench.db"
    port = free_port()
    env = {
        "DATABASE_URL": db,
        "BROADCAST_URL": redis.url,
        "JWT_SECRET": SECRET,
        "PORT": str(port),
        "LOG_LEVEL": "warning",
        "FEED_SOURCE": kind,
        # the simulated feed's own ceiling is 1,000 ticks/s per symbol
        "FEED_TICKS_PER_SECOND": str(min(args.rate / args.symbols, 1000)),
        "WS_HEARTBEAT_SECONDS": "3600",
        "WS_OUTBOX_FRAMES": "65536",  # measure the pipe, not conflation
    }
    spawn(
        [str(ROOT / ".venv/bin/alembic"), "-x", f"url={db}", "upgrade", "head"],
        core=None,
        env=env,
        cwd=ROOT,
    ).wait(60)
    server = spawn(
        [str(ROOT / ".venv/bin/python"), "-m", "app"],
        core=SERVER_CORE,
        env=env,
        cwd=ROOT,
        log=tmp / "server.log",
    )
    reader_token, publisher_token = _tokens()
    base = f"http://127.0.0.1:{port}"
    subscribers = Subscribers(field="source_ts" if kind == "ingest" else "ts")
    stop = asyncio.Event()
    pusher: Pusher | None = None
    try:
        await wait_http_ok(port, "/readyz", server, timeout=60)
        symbols = await _symbols(base, reader_token, args.symbols)
        if len(symbols) < args.symbols:
            raise SystemExit(f"--symbols {args.symbols}: the catalog has {len(symbols)}")
        pusher = Pusher(base, publisher_token, symbols, args.batch)
        await subscribers.open(
            f"ws://127.0.0.1:{port}/v1/ws?token={reader_token}", args.clients, symbols
        )
        pushing = (
            asyncio.create_task(pusher.run(args.rate, args.in_flight, stop))
            if kind == "ingest"
            else None
        )
        await asyncio.sleep(args.warmup)
        cpu_a, got_a, pushed_a = tree_cpu_seconds(server.pid), subscribers.received, pusher.accepted
        started = time.monotonic()
        subscribers.recording = True
        await asyncio.sleep(args.seconds)
        subscribers.recording = False
        elapsed = time.monotonic() - started
        cpu_b, got_b, pushed_b = tree_cpu_seconds(server.pid), subscribers.received, pusher.accepted
        stop.set()
        if pushing is not None:
            await pushing
        delivered = (got_b - got_a) / args.clients / elapsed
        return {
            "kind": kind,
            "accepted_per_s": (pushed_b - pushed_a) / elapsed if kind == "ingest" else None,
            "delivered_per_s": delivered,
            "refused": pusher.refused,
            "failed": pusher.failed,
            "p50_ms": _percentile(subscribers.latencies_ms, 0.50),
            "p99_ms": _percentile(subscribers.latencies_ms, 0.99),
            "max_ms": max(subscribers.latencies_ms, default=float("nan")),
            "cpu_us_per_quote": (cpu_b - cpu_a) / max(delivered * elapsed, 1) * 1e6,
        }
    finally:
        stop.set()
        await subscribers.close()
        if pusher is not None:
            await pusher.close()
        kill(server)
        redis.stop()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=20_000, help="quotes/s asked, in total")
    parser.add_argument("--batch", type=int, default=100, help="quotes per POST (max 1,000)")
    parser.add_argument("--in-flight", type=int, default=4, help="POSTs outstanding at most")
    # One: a Python subscriber parses every tick on the load core, beside Redis and the
    # pusher; at 20,000 quotes/s two of them saturate it and measure their own queueing.
    parser.add_argument("--clients", type=int, default=1, help="WebSocket subscribers")
    parser.add_argument("--symbols", type=int, default=10, help="how many seeded symbols")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    raise_fd_limit()
    rows = [await measure(kind, args) for kind in ("ingest", "simulated")]
    info = machine_info()
    print(
        f"\npricefeed {info['pricefeed']} on {info['cpu']}, {info['cores']} cores; "
        "python -m app with Redis (producer in its own process)"
    )
    print(
        f"{args.rate:,.0f} quotes/s asked over {args.symbols} symbols "
        f"(ingest: batches of {args.batch}), {args.clients} subscribers to every symbol\n"
    )
    print(
        "| feed | accepted quotes/s | delivered/s per subscriber | 503s | errors "
        "| p50 ms | p99 ms | max ms | server CPU µs/quote |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        accepted = "–" if r["accepted_per_s"] is None else f"{r['accepted_per_s']:,.0f}"
        print(
            f"| {r['kind']} | {accepted} | {r['delivered_per_s']:,.0f} | {r['refused']} "
            f"| {r['failed']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} "
            f"| {r['cpu_us_per_quote']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main(), "bench.ingest"))
