#!/usr/bin/env python3
"""Write a replay file (FEED_SOURCE=replay) to stdout: a few minutes of trades in a few of the
seeded instruments, at irregular, realistic intervals, with bid, ask, size and side.

    python scripts/make_replay_sample.py > samples/ticks.csv

The same seed gives the same file, byte for byte (samples/ticks.csv is seed 12, 300 seconds).
Each symbol trades as a Poisson process at its own rate; now and then several prints share one
millisecond (a sweep through the book), which the replay sends as one batch. The mid price
walks; a buy trades at the ask, a sell at the bid. Standard library only.
"""

from __future__ import annotations

import argparse
import csv
import math
import random
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal

START = datetime(2024, 3, 15, 13, 30, tzinfo=UTC)  # the New York open


@dataclass(frozen=True)
class Market:
    symbol: str
    mid: float  # where the walk starts (the seeded reference price)
    decimals: int  # the instrument's price decimals, or fewer (as the venue quotes it)
    trades_per_second: float
    volatility: float  # of the mid, per square root of a second, relative
    spread: float  # relative
    size: tuple[float, float, int]  # smallest, largest, decimals


MARKETS = (
    Market("AAPL", 189.23, 2, 1.6, 0.0004, 0.0001, (1, 400, 0)),
    Market("MSFT", 415.50, 2, 1.2, 0.0004, 0.0001, (1, 300, 0)),
    Market("BTC-USD", 67250.00, 2, 1.5, 0.0006, 0.00002, (0.0001, 0.75, 4)),
    Market("EUR-USD", 1.08450, 5, 0.8, 0.00003, 0.00005, (10_000, 1_000_000, -3)),
)


def quantize(value: float, decimals: int) -> Decimal:
    exponent = Decimal(1).scaleb(-decimals)
    return Decimal(repr(value)).quantize(exponent, ROUND_HALF_EVEN)


def trades(market: Market, seconds: float, rng: random.Random) -> list[tuple[float, list[str]]]:
    """(seconds since START, row fields) for one market."""
    rows: list[tuple[float, list[str]]] = []
    mid, at = market.mid, 0.0
    tick = 10.0**-market.decimals
    low, high, size_decimals = market.size
    while True:
        gap = rng.expovariate(market.trades_per_second)
        at += gap
        if at >= seconds:
            return rows
        mid *= math.exp(rng.gauss(0.0, market.volatility * math.sqrt(gap)))
        prints = 1 if rng.random() > 0.08 else rng.randint(2, 4)  # a sweep: one ms, a few prints
        side = rng.choice(("buy", "sell"))
        half = max(mid * market.spread / 2, tick)
        for level in range(prints):
            # A sweep takes the next level of the book each print: a buy's ask moves up.
            walked = level * tick
            bid = quantize(mid - half - (walked if side == "sell" else 0), market.decimals)
            ask = quantize(mid + half + (walked if side == "buy" else 0), market.decimals)
            # Sizes are log-uniform: many small trades, a few large ones.
            raw_size = math.exp(rng.uniform(math.log(low), math.log(high)))
            size = (
                quantize(raw_size, size_decimals)
                if size_decimals >= 0
                else Decimal(round(raw_size, size_decimals))
            )
            price = ask if side == "buy" else bid
            ts = START + timedelta(milliseconds=math.floor(at * 1000))
            stamp = ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")
            rows.append(
                (at, [stamp, market.symbol, str(price), str(bid), str(ask), str(size), side])
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="length (default 300)")
    parser.add_argument("--seed", type=int, default=12, help="random seed (default 12)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    rows = [row for market in MARKETS for row in trades(market, args.seconds, rng)]
    rows.sort(key=lambda row: row[0])  # stable: a sweep's prints stay in their order
    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow(["ts", "symbol", "price", "bid", "ask", "size", "side"])
    out.writerows(fields for _, fields in rows)


if __name__ == "__main__":
    main()
