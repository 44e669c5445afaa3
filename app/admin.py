"""Operator commands.

python -m app.admin token --sub alice --symbols AAPL,MSFT [--ttl 300]
    print an access token signed with JWT_SECRET (for operators and tests)
python -m app.admin add-client --id desk-1 --symbols '*' [--name "Desk 1"]
    create or update an API client; prints its new secret once (only its hash is kept)
python -m app.admin revoke --jti <jti> | --sub alice [--keep-seconds 86400]
    revoke one token, or every token of a subject issued until now; every instance refuses
    them and closes their streams with 4401 within REVOCATION_POLL_SECONDS
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys

from app.auth.revocations import DEFAULT_KEEP_SECONDS, revoke
from app.auth.service import upsert_client
from app.config import get_settings
from app.db import create_engine, create_session_factory
from app.prices.ticks import normalise_symbol
from app.security import TokenSigner


def _symbols(raw: str) -> list[str]:
    if raw.strip() == "*":
        return ["*"]
    symbols = [normalise_symbol(s) for s in raw.split(",") if s.strip()]
    if not symbols or any(s is None for s in symbols):
        raise argparse.ArgumentTypeError(f"not a list of symbols: {raw!r}")
    return [s for s in symbols if s is not None]


async def _add_client(client_id: str, name: str, symbols: list[str]) -> str:
    engine = create_engine(get_settings().database_url)
    secret = secrets.token_urlsafe(32)
    try:
        async with create_session_factory(engine)() as session:
            await upsert_client(
                session, client_id=client_id, name=name, secret=secret, symbols=symbols
            )
    finally:
        await engine.dispose()
    return secret


async def _revoke(jti: str | None, subject: str | None, keep_seconds: float) -> None:
    engine = create_engine(get_settings().database_url)
    try:
        async with create_session_factory(engine)() as session:
            await revoke(session, jti=jti, subject=subject, keep_seconds=keep_seconds)
    finally:
        await engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.admin",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    token = commands.add_parser("token", help="print an access token")
    token.add_argument("--sub", required=True, help="the token subject")
    # No default: every symbol (`*`) is a choice the operator writes out, never an omission.
    token.add_argument("--symbols", type=_symbols, required=True, help="AAPL,MSFT or '*'")
    token.add_argument("--ttl", type=int, default=None, help="seconds (default JWT_TTL_SECONDS)")
    add = commands.add_parser("add-client", help="create or update an API client")
    add.add_argument("--id", required=True, dest="client_id")
    add.add_argument("--name", default=None)
    add.add_argument("--symbols", type=_symbols, required=True, help="AAPL,MSFT or '*'")
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
    args = parser.parse_args(argv)

    settings = get_settings()
    if args.command == "add-client" and settings.env == "prod":
        if args.client_id == settings.demo_client_id:
            # prod disables this client at every start (app/main.py): it would not last.
            parser.error(f"--id {args.client_id} is DEMO_CLIENT_ID, disabled in prod: pick another")
    if args.command == "token":
        signer = TokenSigner(
            secret=settings.jwt_secret,
            audience=settings.jwt_audience,
            ttl_seconds=settings.jwt_ttl_seconds,
            leeway_seconds=settings.jwt_leeway_seconds,
        )
        print(signer.issue(subject=args.sub, symbols=args.symbols, ttl_seconds=args.ttl))
    elif args.command == "revoke":
        asyncio.run(_revoke(args.jti, args.sub, args.keep_seconds))
        print(f"revoked {'jti ' + args.jti if args.jti else 'subject ' + args.sub}")
    else:
        secret = asyncio.run(_add_client(args.client_id, args.name or args.client_id, args.symbols))
        print(f"client_id={args.client_id}")
        print(f"client_secret={secret}")
        print("(the secret is shown once; only its hash is stored)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
