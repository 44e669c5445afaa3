"""Tick publisher for the benchmark (runs in its own process, pinned to the load core).

Modes:
  ``publish``  ``PUBLISH prices:<SYMBOL> <tick json>`` on Redis (pricefeed, broadcaster-readme)
  ``sio``      ``socketio.AsyncRedisManager(write_only=True).emit("tick", tick, room=SYMBOL)``
               (python-socketio peer)

Ticks are ``{"type":"tick","symbol":S,"price":"123.4500","ts":<ms now>,"seq":<n>,"volume":"10"}``,
``seq`` from 1 per symbol per run, symbols taken round-robin so each symbol gets
``rate / len(symbols)`` evenly spaced ticks a second.

How they go out (``--publish``):
  ``burst``  every 5 ms, whatever is due then, in one pipelined write: the server reads the
             ticks of a step together (several per read once the rate passes 200 ticks/s).
  ``even``   each tick at its own time slot (``start + k / rate``), one command a write,
             awaited before the next: one tick per read at the server, as an exchange's
             feed arrives. A tick the publisher is late for goes at once, still alone.

Control on stdin, one command a line: ``mark`` answers one JSON line
``{"ticks": n, "elapsed": s}`` counted since the previous mark (or the start); ``quit`` or EOF
stops.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from typing import Any

import orjson

STEP_S = 0.005  # burst mode's publishing granularity


class TickSource:
    def __init__(self, symbols: list[str]) -> None:
        self.symbols = symbols
        self.seq = dict.fromkeys(symbols, 0)
        self.price = {s: 100.0 + 10 * i for i, s in enumerate(symbols)}
        self.next = 0

    def make(self) -> dict[str, Any]:
        sym = self.symbols[self.next]
        self.next = (self.next + 1) % len(self.symbols)
        self.seq[sym] += 1
        p = self.price[sym] = self.price[sym] + random.uniform(-0.05, 0.05)
        return {
            "type": "tick",
            "symbol": sym,
            "price": f"{p:.4f}",
            "ts": int(time.time() * 1000),
            "seq": self.seq[sym],
            "volume": "10",
        }


async def _publisher(args: argparse.Namespace):  # returns an async callable(list[tick])
    if args.mode == "publish":
        import redis.asyncio as redis

        conn = redis.Redis.from_url(args.redis_url)
        await conn.ping()

        async def send(ticks: list[dict[str, Any]]) -> None:
            if len(ticks) == 1:  # one command, one write (always so in even mode)
                t = ticks[0]
                await conn.publish(f"prices:{t['symbol']}", orjson.dumps(t))
                return
            pipe = conn.pipeline(transaction=False)
            for t in ticks:
                pipe.publish(f"prices:{t['symbol']}", orjson.dumps(t))
            await pipe.execute()

        return send
    import socketio

    mgr = socketio.AsyncRedisManager(args.redis_url, write_only=True)

    async def send(ticks: list[dict[str, Any]]) -> None:
        for t in ticks:
            await mgr.emit("tick", t, room=t["symbol"], namespace="/")

    return send


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["publish", "sio"], default="publish")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--symbols", default="AAPL")
    ap.add_argument("--rate", type=float, required=True, help="ticks per second, all symbols")
    ap.add_argument(
        "--publish",
        choices=["burst", "even"],
        default="burst",
        help="burst: what is due every 5 ms in one write; even: one tick per write, each at "
        "its own time slot",
    )
    args = ap.parse_args()

    send = await _publisher(args)
    src = TickSource(args.symbols.split(","))
    sent = 0
    mark_sent, mark_at = 0, time.monotonic()
    stop = asyncio.Event()

    async def control() -> None:
        nonlocal mark_sent, mark_at, rate, start, base
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            line = (await reader.readline()).decode().strip()
            if line == "mark":
                now = time.monotonic()
                out = {"ticks": sent - mark_sent, "elapsed": now - mark_at}
                sys.stdout.write(orjson.dumps(out).decode() + "\n")
                sys.stdout.flush()
                mark_sent, mark_at = sent, now
            elif line.startswith("rate "):  # a new rate from now on (the scale ladder)
                rate, start, base = float(line.split()[1]), time.monotonic(), sent
                sys.stdout.write(orjson.dumps({"rate": rate}).decode() + "\n")
                sys.stdout.flush()
            elif line == "quit" or not line:
                stop.set()
                return

    rate, base = args.rate, 0
    start = time.monotonic()
    ctl = asyncio.create_task(control())
    while not stop.is_set():
        due = base + int(rate * (time.monotonic() - start)) - sent
        if args.publish == "even":
            if due > 0:  # this slot's tick (a late one goes at once, still alone)
                await send([src.make()])
                sent += 1
            else:  # until the next slot
                await asyncio.sleep(start + (sent - base + 1) / rate - time.monotonic())
            continue
        if due > 0:
            due = min(due, max(1, int(rate * 0.05)))
            await send([src.make() for _ in range(due)])
            sent += due
        await asyncio.sleep(STEP_S)
    ctl.cancel()


if __name__ == "__main__":
    from bench.procs import run_async

    run_async(main())
