"""Redis's own CPU per store write: the producer's fenced script for one S1 batch (10 runs of
one tick, each with its four candles), as `INFO commandstats` counts it on a fresh
`redis-server` on core 1. Beside the script's total, the commands it ran: the rest is Lua.
A write's time in Redis is in every tick's latency, between its stamp and its publish.

    python -m bench.scriptcost                      # this checkout's store
    cd /tmp/base && python -c "import runpy, sys; sys.argv = ['scriptcost']; \\
        runpy.run_path('$REPO/bench/scriptcost.py', run_name='__main__')"   # another tree's
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from decimal import Decimal
from pathlib import Path

from redis.asyncio import Redis as RedisClient

from app.prices.candles import INTERVALS_MS, Candle, fold_prices
from app.prices.store import RedisTickStore, Run
from app.prices.ticks import encode_tick
from app.redis_commands import CommandConnection
from bench.procs import Redis, run_main

SYMBOLS = [f"S{i}" for i in range(50)]


def batch(n: int, held: dict[tuple[str, str], Candle], clock: list[int]) -> list[Run]:
    """The n-th slot of S1: ten symbols, one tick each, a minute's candle closing now and
    then (as the stamper hands them over: the closed one's final state first)."""
    runs = []
    for symbol in SYMBOLS[(n % 5) * 10 : (n % 5) * 10 + 10]:
        clock[0] += 7
        ts, price = clock[0], Decimal(100 + n % 7)
        candles = []
        for interval, ms in INTERVALS_MS.items():
            current = held.get((symbol, interval))
            candle = fold_prices(current, ms, ts, price, price, price, price, Decimal(1))
            if current is not None and current.start != candle.start:
                candles.append((interval, current))
            candles.append((interval, candle))
            held[(symbol, interval)] = candle
        tick = encode_tick(symbol=symbol, price=price, ts=ts, seq=n + 1)
        runs.append(Run(symbol, [tick], candles))
    return runs


async def main(args: argparse.Namespace) -> int:
    redis = Redis(Path(tempfile.mkdtemp(prefix="scriptcost-")))
    await redis.ready()
    client = RedisClient.from_url(redis.url)
    store = RedisTickStore(
        client,
        prefix="bench",
        retention=100_000,
        candles_kept=500,
        commands=CommandConnection.like(client),
    )
    try:
        held: dict[tuple[str, str], Candle] = {}
        clock = [1_764_300_000_000]
        for n in range(200):  # warm: every key exists, the script is loaded
            await store.append_runs(batch(n, held, clock), fence=None)
        await client.config_resetstat()
        for n in range(200, 200 + args.batches):
            await store.append_runs(batch(n, held, clock), fence=None)
        stats = await client.info("commandstats")
        script = stats["cmdstat_evalsha"]
        commands = sum(v["usec"] for k, v in stats.items() if k != "cmdstat_evalsha")
        print(
            f"store write, 10 runs of one tick: {script['usec_per_call']:.1f} µs a script in "
            f"Redis, of which commands {commands / script['calls']:.1f} µs "
            f"({script['calls']} scripts)"
        )
    finally:
        await store.close()
        await client.aclose()
        redis.stop()
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=2000)
    sys.exit(run_main(main(ap.parse_args()), "bench.scriptcost"))
