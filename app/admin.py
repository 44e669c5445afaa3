"""Operator commands.

python -m app.admin token --sub alice --symbols AAPL,MSFT [--scopes publish] [--ttl 300]
    print an access token signed with JWT_SECRET (for operators and tests)
python -m app.admin add-client --id desk-1 --symbols '*' [--scopes publish] [--name "Desk 1"]
    create or update an API client; prints its new secret once (only its hash is kept).
    --scopes publish: it may push prices (POST /v1/ingest); a feeder needs no --symbols.
    Each of these two commands needs --symbols, --scopes or both.
python -m app.admin revoke --jti <jti> | --sub alice [--keep-seconds 86400]
    revoke one token, or every token of a subject issued until now; every instance refuses
    them and closes their streams with 4401 within REVOCATION_POLL_SECONDS
python -m app.admin add-instrument --symbol XRP-USD --name "XRP / US Dollar" \
        --asset-class crypto --decimals 4 [--reference-price 0.5123]
    create an instrument, or update one and make it active again; every instance lists,
    routes and produces it within INSTRUMENT_POLL_SECONDS (the simulated source starts at the
    reference price: 1 for a new instrument without one; an existing one keeps its own)
python -m app.admin disable-instrument --symbol XRP-USD
    make an instrument inactive: every instance answers 404 for it and ends or drops its
    streams (WebSocket close 4404; app/prices/protocol.md) within INSTRUMENT_POLL_SECONDS
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal

from sqlalchemy.ext.asyncio import AsyncSession

from app.auth.revocations import DEFAULT_KEEP_SECONDS, revoke
from app.auth.service import upsert_client
from app.config import Settings, get_settings
from app.db import DATABASE_ERRORS, create_engine, create_session_factory
from app.feed.quotes import QuoteError, parse_amount
from app.instruments.repository import (
    ASSET_CLASSES,
    MAX_DECIMALS,
    MAX_NAME_LENGTH,
    UnknownInstrument,
    disable_instrument,
    upsert_instrument,
)
from app.prices.ticks import normalise_symbol
from app.security import KNOWN_SCOPES, TokenSigner


def _symbols(raw: str) -> list[str]:
    if raw.strip() == "*":
        return ["*"]
    symbols = [normalise_symbol(s) for s in raw.split(",") if s.strip()]
    if not symbols or any(s is None for s in symbols):
        raise argparse.ArgumentTypeError(f"not a list of symbols: {raw!r}")
    return [s for s in symbols if s is not None]


def _symbol(raw: str) -> str:
    symbol = normalise_symbol(raw)
    if symbol is None:
        raise argparse.ArgumentTypeError(
            f"not a symbol: {raw[:40]!r} (1 to 16 of A-Z, 0-9, '.', '-', starting with a "
            "letter or digit)"
        )
    return symbol


def _name(raw: str) -> str:
    name = raw.strip()
    if not name or len(name) > MAX_NAME_LENGTH or not name.isprintable():
        raise argparse.ArgumentTypeError(
            f"a name is 1 to {MAX_NAME_LENGTH} printable characters, not {raw[:40]!r}"
        )
    return name


def _decimals(raw: str) -> int:
    if not (raw.isascii() and raw.isdigit()) or int(raw) > MAX_DECIMALS:
        raise argparse.ArgumentTypeError(
            f"decimals is a whole number from 0 to {MAX_DECIMALS}, not {raw[:20]!r}"
        )
    return int(raw)


def _reference_price(raw: str | None, decimals: int) -> Decimal | None:
    """A positive decimal with at most `decimals` places, checked as every quote's price is."""
    if raw is None:
        return None
    try:
        return parse_amount(raw, "reference price", decimals=decimals)
    except QuoteError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@asynccontextmanager
async def _session() -> AsyncIterator[AsyncSession]:
    """A session on DATABASE_URL, its engine disposed after: one command, one connection."""
    engine = create_engine(get_settings().database_url)
    try:
        async with create_session_factory(engine)() as session:
            yield session
    finally:
        await engine.dispose()


async def _add_instrument(
    symbol: str, name: str, asset_class: str, decimals: int, reference_price: Decimal | None
) -> str:
    async with _session() as session:
        write = await upsert_instrument(
            session,
            symbol=symbol,
            name=name,
            asset_class=asset_class,
            price_decimals=decimals,
            reference_price=reference_price,
        )
    return write.describe()


async def _disable_instrument(symbol: str) -> bool:
    async with _session() as session:
        return await disable_instrument(session, symbol)


def _scopes(raw: str) -> list[str]:
    scopes = sorted({s.strip() for s in raw.replace(" ", ",").split(",") if s.strip()})
    unknown = [s for s in scopes if s not in KNOWN_SCOPES]
    if not scopes or unknown:
        known = ", ".join(sorted(KNOWN_SCOPES))
        raise argparse.ArgumentTypeError(f"not a list of scopes ({known}): {raw!r}")
    return scopes


async def _add_client(client_id: str, name: str, symbols: list[str], scopes: list[str]) -> str:
    secret = secrets.token_urlsafe(32)
    async with _session() as session:
        await upsert_client(
            session,
            client_id=client_id,
            name=name,
            secret=secret,
            symbols=symbols,
            scopes=scopes,
        )
    return secret


async def _revoke(jti: str | None, subject: str | None, keep_seconds: float) -> None:
    async with _session() as session:
        await revoke(session, jti=jti, subject=subject, keep_seconds=keep_seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.admin",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    token = commands.add_parser("token", help="print an access token")
    token.add_argument("--sub", required=True, help="the token subject")
    token.add_argument("--ttl", type=int, default=None, help="seconds (default JWT_TTL_SECONDS)")
    add = commands.add_parser("add-client", help="create or update an API client")
    add.add_argument("--id", required=True, dest="client_id")
    add.add_argument("--name", default=None)
    for command in (token, add):
        # No default: every symbol (`*`) is a choice the operator writes out, never an
        # omission. A feeder may read nothing: --scopes alone.
        command.add_argument("--symbols", type=_symbols, default=[], help="AAPL,MSFT or '*'")
        command.add_argument(
            "--scopes",
            type=_scopes,
            default=[],
            help=f"what else it may do: {', '.join(sorted(KNOWN_SCOPES))} (push prices)",
        )
    revoked = commands.add_parser("revoke", help="revoke a token, or a subject's tokens so far")
    which = revoked.add_mutually_exclusive_group(required=True)
    which.add_argument("--jti", help="the token's `jti` claim")
    which.add_argument("--sub", help="every token of this subject issued until now")
    revoked.add_argument(
        "--keep-seconds",
        type=float,
        default=DEFAULT_KEEP_SECONDS,
        help="how long the revocation is kept: at least the tokens' lifetime (default a day)",
    )
    instrument = commands.add_parser(
        "add-instrument", help="create an instrument, or update and re-activate one"
    )
    instrument.add_argument("--symbol", type=_symbol, required=True, help="e.g. XRP-USD")
    instrument.add_argument("--name", type=_name, required=True, help='e.g. "XRP / US Dollar"')
    instrument.add_argument("--asset-class", required=True, choices=ASSET_CLASSES)
    instrument.add_argument(
        "--decimals", type=_decimals, required=True, help=f"price places, 0 to {MAX_DECIMALS}"
    )
    instrument.add_argument(
        "--reference-price",
        default=None,
        help="where the simulated source starts: a positive decimal with at most --decimals "
        "places (a new instrument without one starts at 1; an existing one keeps its own)",
    )
    disable = commands.add_parser("disable-instrument", help="make an instrument inactive")
    disable.add_argument("--symbol", type=_symbol, required=True)
    args = parser.parse_args(argv)

    if args.command in ("token", "add-client") and not (args.symbols or args.scopes):
        parser.error(
            f"{args.command}: give --symbols (what it may read), --scopes (what else it may "
            "do: publish), or both"
        )
    settings = get_settings()
    if args.command == "add-client" and settings.env == "prod":
        if args.client_id == settings.demo_client_id:
            # prod disables this client at every start (app/main.py): it would not last.
            parser.error(f"--id {args.client_id} is DEMO_CLIENT_ID, disabled in prod: pick another")
    price: Decimal | None = None  # add-instrument's, checked against its --decimals
    if args.command == "add-instrument":
        try:
            price = _reference_price(args.reference_price, args.decimals)
        except argparse.ArgumentTypeError as exc:
            instrument.error(f"argument --reference-price: {exc}")
    try:
        return _run(args, settings, price)
    except DATABASE_ERRORS as exc:
        print(
            f"error: cannot use the database ({str(exc).splitlines()[0][:200]}); "
            "is DATABASE_URL right, and has `alembic upgrade head` run?",
            file=sys.stderr,
        )
        return 1


def _run(args: argparse.Namespace, settings: Settings, price: Decimal | None) -> int:
    """Carry out the parsed command; its exit status."""
    if args.command == "token":
        signer = TokenSigner(
            secret=settings.jwt_secret,
            audience=settings.jwt_audience,
            ttl_seconds=settings.jwt_ttl_seconds,
            leeway_seconds=settings.jwt_leeway_seconds,
        )
        print(
            signer.issue(
                subject=args.sub, symbols=args.symbols, scopes=args.scopes, ttl_seconds=args.ttl
            )
        )
    elif args.command == "add-instrument":
        print(
            asyncio.run(
                _add_instrument(args.symbol, args.name, args.asset_class, args.decimals, price)
            )
        )
    elif args.command == "disable-instrument":
        try:
            disabled = asyncio.run(_disable_instrument(args.symbol))
        except UnknownInstrument:
            print(f"error: no instrument {args.symbol}; nothing disabled", file=sys.stderr)
            return 1
        print(f"disabled {args.symbol}" if disabled else f"{args.symbol} was disabled already")
    elif args.command == "revoke":
        asyncio.run(_revoke(args.jti, args.sub, args.keep_seconds))
        print(f"revoked {'jti ' + args.jti if args.jti else 'subject ' + args.sub}")
    else:
        secret = asyncio.run(
            _add_client(args.client_id, args.name or args.client_id, args.symbols, args.scopes)
        )
        print(f"client_id={args.client_id}")
        print(f"client_secret={secret}")
        print("(the secret is shown once; only its hash is stored)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
