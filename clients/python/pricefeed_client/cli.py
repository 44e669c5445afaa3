"""`python -m pricefeed_client latest|history|candles|watch …`.

`latest`, `history` and `candles` print JSON, one object a line. `watch` draws a live table
(with `rich`, the `cli` extra, on a terminal) under a line that says how the connection is;
piped, or with `--plain`, it prints `SYMBOL seq price ts` per tick, and what happens to the
connection on stderr. Env: PRICEFEED_URL, PRICEFEED_CLIENT_ID, PRICEFEED_CLIENT_SECRET."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from datetime import datetime

import httpx

from pricefeed_client.client import PricefeedClient
from pricefeed_client.errors import ApiError, PricefeedError
from pricefeed_client.models import as_millis
from pricefeed_client.stream import logger


def _moment(text: str) -> int:
    """Epoch milliseconds, or an ISO 8601 time (UTC unless it says otherwise)."""
    if text.isdigit():
        return int(text)
    try:
        return as_millis(datetime.fromisoformat(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not epoch ms nor ISO 8601: {text!r}") from None


def _print(body: object) -> None:
    print(json.dumps(body), flush=True)


async def _run(args: argparse.Namespace) -> int:
    async with PricefeedClient() as feed:
        if args.command == "latest":
            _print((await feed.latest(args.symbol)).to_json())
        elif args.command == "history":
            async for tick in feed.iter_history(
                args.symbol, since=args.since, start=args.start, end=args.end, limit=args.limit
            ):
                _print(tick.to_json())
        elif args.command == "candles":
            for candle in await feed.candles(
                args.symbol,
                interval=args.interval,
                start=args.start,
                end=args.end,
                limit=args.limit,
            ):
                _print(candle.to_json())
        elif args.plain or not sys.stdout.isatty() or not _has_rich():
            async for tick in feed.watch(args.symbols):
                print(tick.symbol, tick.seq, tick.price, tick.ts, flush=True)
        else:
            from pricefeed_client.board import LiveBoard  # rich, only when drawn

            with LiveBoard(args.symbols, feed.url) as board:
                async for item in feed.watch_events(args.symbols):
                    board.show(item)
    return 0


def _has_rich() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="pricefeed: latest prices, history, candles, live ticks",
        epilog="Env: PRICEFEED_URL, PRICEFEED_CLIENT_ID, PRICEFEED_CLIENT_SECRET.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    latest = commands.add_parser("latest", help="print the latest tick as JSON")
    latest.add_argument("symbol")
    history = commands.add_parser("history", help="print past ticks, one JSON per line")
    history.add_argument("symbol")
    history.add_argument("--since", type=int, default=None, help="only ticks with a greater seq")
    history.add_argument("--start", type=_moment, default=None, help="epoch ms or ISO 8601")
    history.add_argument("--end", type=_moment, default=None, help="epoch ms or ISO 8601")
    history.add_argument("--limit", type=int, default=100, help="ticks (a page, with --start)")
    candles = commands.add_parser("candles", help="print OHLCV candles, one JSON per line")
    candles.add_argument("symbol")
    candles.add_argument("--interval", choices=["1m", "5m", "1h", "1d"], default="1m")
    candles.add_argument("--start", type=_moment, default=None, help="epoch ms or ISO 8601")
    candles.add_argument("--end", type=_moment, default=None, help="epoch ms or ISO 8601")
    candles.add_argument("--limit", type=int, default=100)
    watch = commands.add_parser("watch", help="live prices: a table, or a line per tick")
    watch.add_argument("symbols", nargs="+", metavar="SYMBOL")
    watch.add_argument("--plain", action="store_true", help="'SYMBOL seq price ts' per tick")
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m pricefeed_client") -> int:
    args = build_parser(prog).parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("pricefeed: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 0
    except ApiError as exc:
        hint = " (check PRICEFEED_CLIENT_ID / PRICEFEED_CLIENT_SECRET)" if exc.status == 401 else ""
        print(f"error: {exc}{hint}", file=sys.stderr)
    except PricefeedError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except (httpx.HTTPError, OSError) as exc:
        print(f"error: cannot reach the service: {exc or type(exc).__name__}", file=sys.stderr)
    finally:
        logger.removeHandler(handler)
    return 1
