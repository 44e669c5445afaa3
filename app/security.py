"""Access tokens and client secrets. The only module that imports `jose`.

Every decode names its algorithm list and requires `exp`, `aud` and `sub`: python-jose
otherwise accepts whatever algorithm the token header claims and skips `aud`/`exp`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from jose import jwt

ALGORITHM = "HS256"
MAX_TOKEN_LENGTH = 4096  # ours are ~300 bytes; anything far larger is not worth parsing

# scrypt work factors: ~40 ms and 16 MiB per check; only the token endpoint pays it.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


class InvalidToken(Exception):
    """The token is missing, malformed, badly signed, for another audience or algorithm."""


class ExpiredToken(InvalidToken):
    """The token was valid once; its `exp` is past."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified token speaks for, and what it may read."""

    subject: str
    symbols: frozenset[str]
    expires_at: float  # Unix seconds

    @property
    def all_symbols(self) -> bool:
        return "*" in self.symbols

    def may_read(self, symbol: str) -> bool:
        return "*" in self.symbols or symbol in self.symbols


@dataclass(frozen=True, slots=True)
class TokenSigner:
    secret: str
    audience: str
    ttl_seconds: int
    leeway_seconds: int

    def issue(self, *, subject: str, symbols: list[str], ttl_seconds: int | None = None) -> str:
        now = int(time.time())
        claims = {
            "sub": subject,
            "aud": self.audience,
            "iat": now,
            "exp": now + (ttl_seconds if ttl_seconds is not None else self.ttl_seconds),
            "symbols": symbols,
        }
        return str(jwt.encode(claims, self.secret, algorithm=ALGORITHM))

    def verify(self, token: str) -> Principal:
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken("token too long")
        try:
            claims = jwt.decode(
                token,
                self.secret,
                algorithms=[ALGORITHM],
                audience=self.audience,
                options={
                    "require_exp": True,
                    "require_aud": True,
                    "require_sub": True,
                    "verify_exp": True,
                    "verify_aud": True,
                    "leeway": self.leeway_seconds,
                },
            )
        except jwt.ExpiredSignatureError as exc:
            raise ExpiredToken("token expired") from exc
        except Exception as exc:  # any parse failure (a crafted header can
            # even exhaust the JSON parser's recursion) is simply a bad token
            raise InvalidToken("invalid token") from exc
        symbols = claims.get("symbols")
        subject = claims.get("sub")
        exp = claims.get("exp")
        if (
            not isinstance(subject, str)
            or not subject
            or not isinstance(symbols, list)
            or not all(isinstance(s, str) for s in symbols)
            or not isinstance(exp, int | float)
        ):
            raise InvalidToken("invalid token claims")
        return Principal(subject=subject, symbols=frozenset(symbols), expires_at=float(exp))


def hash_secret(secret: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P)
    return f"scrypt${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_secret(secret: str, secret_hash: str) -> bool:
    try:
        scheme, salt_b64, digest_b64 = secret_hash.split("$")
        salt, expected = base64.b64decode(salt_b64), base64.b64decode(digest_b64)
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    digest = hashlib.scrypt(secret.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P)
    return hmac.compare_digest(digest, expected)


# Equalises the time of a check for an unknown client id with that of a known one.
DUMMY_SECRET_HASH = hash_secret(secrets.token_urlsafe(16))
