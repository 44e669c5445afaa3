"""Server CPU per tick with nobody subscribed: what every tick costs before any fan-out.

That is the broker's read of the message, its hand-over to the hub, decoding and
bookkeeping, and the event loop's wake-up. In S1 (200 ticks/s, 100 subscribers each) every
100 µs of it is 1 µs per delivered message. Next to it, `bare`: a uvloop protocol subscribed
to the same channels that parses each message with hiredis and orjson and does nothing else,
the floor for a Python process woken by each message on this machine.

    python -m bench.tickcost                      # pricefeed and bare, 3 rounds of 20 s
    python -m bench.tickcost --rate 200 --seconds 10 --rounds 1
    BENCH_BASE_TREE=/tmp/base python -m bench.tickcost --kinds pricefeed,pricefeed-base,bare

Pinning as in `python -m bench`: the subscriber on core 0; Redis and the publisher on core 1.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench import procs
from bench.procs import LOAD_CORE, SERVER_CORE, Redis, free_port, kill, spawn
from bench.servers import PRICEFEED_SYMBOLS, REPO, SERVERS

BARE = """
import asyncio, sys, hiredis, orjson, uvloop

class Subscriber(asyncio.Protocol):
    def __init__(self):
        self.reader = hiredis.Reader()

    def connection_made(self, transport):
        channels = " ".join("prices:" + s for s in sys.argv[2].split(","))
        transport.write(f"SUBSCRIBE {channels}\\r\\n".encode())

    def data_received(self, data):
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if reply[0] == b"message":
                orjson.loads(reply[2])

async def main():
    await asyncio.get_running_loop().create_connection(Subscriber, "127.0.0.1", int(sys.argv[1]))
    await asyncio.Event().wait()

uvloop.run(main())
"""


async def measure(kind: str, rate: float, seconds: float) -> float:
    """CPU µs per tick of one fresh subscriber process of `kind`."""
    workdir = Path(tempfile.mkdtemp(prefix=f"tickcost-{kind}-"))
    redis = server = producer = None
    try:
        redis = Redis(workdir)
        await redis.ready()
        log = workdir / "server.log"
        if kind in SERVERS and SERVERS[kind].client_kind == "pricefeed":
            spec = SERVERS[kind]
            port = free_port()
            await spec.prepare(
                port=port, redis_url=redis.url, workdir=workdir, log=log, symbols=PRICEFEED_SYMBOLS
            )
            server = spec.start(port=port, redis_url=redis.url, workdir=workdir, log=log)
            await procs.wait_http_ok(port, spec.health_path, server, timeout=60)
        else:
            cmd = [sys.executable, "-c", BARE, str(redis.port), ",".join(PRICEFEED_SYMBOLS)]
            server = spawn(cmd, core=SERVER_CORE, cwd=REPO, log=log)
        await asyncio.sleep(1.0)
        cmd, cwd = SERVERS["pricefeed"].producer_cmd(
            redis_url=redis.url, symbols=PRICEFEED_SYMBOLS, rate=rate
        )
        producer = spawn(cmd, core=LOAD_CORE, cwd=cwd, log=workdir / "producer.log", pipe=True)
        await asyncio.sleep(3.0)  # warm-up
        if server.poll() is not None:
            raise RuntimeError(f"{kind} exited: {log.read_text()[-500:]}")
        before = procs.tree_cpu_seconds(server.pid)
        await asyncio.sleep(seconds)
        used = procs.tree_cpu_seconds(server.pid) - before
        return used * 1e6 / (rate * seconds)
    finally:
        for proc in (producer, server):
            if proc is not None:
                kill(proc, timeout=2)
        if redis is not None:
            redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def amain(opts: argparse.Namespace) -> int:
    kinds = opts.kinds.split(",")
    results: dict[str, list[float]] = {k: [] for k in kinds}
    for round_ in range(opts.rounds):
        for kind in kinds:  # alternated, so a noisy minute hits both
            await procs.wait_quiet(10.0)
            us = await measure(kind, opts.rate, opts.seconds)
            results[kind].append(us)
            print(f"round {round_ + 1} {kind:9s} {us:6.0f} µs CPU per tick", flush=True)
    print(f"\n{opts.rate:g} ticks/s over {len(PRICEFEED_SYMBOLS)} symbols, no subscribers:")
    for kind, values in results.items():
        print(
            f"  {kind:9s} median {statistics.median(values):4.0f} µs per tick "
            f"(runs: {', '.join(f'{v:.0f}' for v in values)})"
        )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tickcost", description=__doc__)
    ap.add_argument("--rate", type=float, default=200.0, help="ticks/s, all symbols")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured window per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--kinds", default="pricefeed,bare", help="bare, and pricefeed servers of python -m bench"
    )
    opts = ap.parse_args()
    return procs.run_main(amain(opts), "tickcost")


if __name__ == "__main__":
    sys.exit(main())
