"""Access tokens and client secrets. The only module that imports `jose`.

Every decode names its algorithm list and requires `exp`, `aud` and `sub`: python-jose
otherwise accepts whatever algorithm the token header claims and skips `aud`/`exp`.

A token's `scope` claim (space-separated, OAuth style) says what it may do beyond reading its
`symbols`: `publish` pushes prices (`POST /v1/ingest`). Ours carry it only when the client has
scopes; an external issuer's is read the same way.

Two kinds of token verify: ours (HS256 with `JWT_SECRET`) and an external issuer's (RS256 or
ES256 with a configured public key, `iss` required). Each key verifies one algorithm, the one
its type fixes (the shared secret HS256, an RSA key RS256, an EC P-256 key ES256), so a public
key can never verify an HMAC token made with its own bytes as the secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jose import jwk, jwt

ALGORITHM = "HS256"
EXTERNAL_ALGORITHMS = ("RS256", "ES256")  # an RSA key verifies RS256, an EC P-256 key ES256
MAX_TOKEN_LENGTH = 4096  # ours are ~300 bytes; anything far larger is not worth parsing

PUBLISH = "publish"  # push prices: POST /v1/ingest
KNOWN_SCOPES = frozenset({PUBLISH})

# scrypt work factors: ~40 ms and 16 MiB per check; only the token endpoint pays it.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


class InvalidToken(Exception):
    """The token is missing, malformed, badly signed, for another audience or algorithm."""


class ExpiredToken(InvalidToken):
    """The token was valid once; its `exp` is past."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a verified token speaks for, what it may read, and what else it may do."""

    subject: str
    symbols: frozenset[str]
    expires_at: float  # Unix seconds
    token_id: str | None = None  # the `jti`, which a revocation names
    issued_at: float | None = None  # the `iat`, if the token has one
    scopes: frozenset[str] = frozenset()  # the `scope` claim's words, e.g. {"publish"}

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

    def issue(
        self,
        *,
        subject: str,
        symbols: list[str],
        scopes: Iterable[str] = (),
        ttl_seconds: int | None = None,
    ) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "sub": subject,
            "aud": self.audience,
            "iat": now,
            "exp": now + (ttl_seconds if ttl_seconds is not None else self.ttl_seconds),
            "symbols": symbols,
            # Hex: an id that began with "-" would read as an option to `app.admin revoke --jti`.
            "jti": secrets.token_hex(16),  # what `python -m app.admin revoke` names
        }
        scope = " ".join(sorted(set(scopes)))
        if scope:  # no claim at all for a token that may only read
            claims["scope"] = scope
        return str(jwt.encode(claims, self.secret, algorithm=ALGORITHM))

    def verify(self, token: str) -> Principal:
        return _decode(token, self.secret, ALGORITHM, self.audience, None, self.leeway_seconds)


@dataclass(frozen=True, slots=True)
class PublicKey:
    """An external issuer's verification key and the one algorithm its type allows."""

    algorithm: str  # RS256 or ES256
    key: Any  # a python-jose Key
    kid: str | None = None


def _public_key(source: str | dict[str, Any], kid: str | None = None) -> PublicKey:
    """A PEM text or a JWK; the algorithm follows from the key type, never from the token
    (nor from a JWK's `alg`, which may only agree with it)."""
    for algorithm in EXTERNAL_ALGORITHMS:
        try:
            key = jwk.construct(source, algorithm)
            fields = key.to_dict()
        except Exception:  # noqa: BLE001 - not a key of this type: try the next
            continue
        if not key.is_public():
            raise ValueError("a private key where a public key belongs: give its public half")
        kind = fields.get("kty"), fields.get("crv")
        if (algorithm, kind) in (("RS256", ("RSA", None)), ("ES256", ("EC", "P-256"))):
            if isinstance(source, dict) and source.get("alg", algorithm) != algorithm:
                raise ValueError(f"JWK alg {source['alg']!r} does not match its key type")
            return PublicKey(algorithm=algorithm, key=key, kid=kid)
    raise ValueError("not an RSA or EC P-256 public key")


def load_public_keys(*, pem_file: str = "", jwks_file: str = "") -> list[PublicKey]:
    """The keys of JWT_PUBLIC_KEY_FILE (one PEM) and JWT_JWKS_FILE (a JWK Set)."""
    keys: list[PublicKey] = []
    if pem_file:
        keys.append(_public_key(Path(pem_file).read_text(encoding="ascii")))
    if jwks_file:
        document = json.loads(Path(jwks_file).read_text(encoding="utf-8"))
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{jwks_file}: not a JWK Set with keys")
        for entry in entries:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue  # encryption keys verify nothing
            keys.append(_public_key(entry, kid=entry.get("kid")))
    return keys


@dataclass(frozen=True, slots=True)
class TokenVerifier:
    """Verifies ours (HS256, `signer`) and, if keys are configured, an external issuer's."""

    signer: TokenSigner
    public_keys: tuple[PublicKey, ...] = ()
    issuer: str = ""

    def verify(self, token: str) -> Principal:
        if not self.public_keys:  # ours alone: no header to read first
            return self.signer.verify(token)
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken("token too long")
        try:
            header = jwt.get_unverified_header(token)
        except Exception as exc:
            raise InvalidToken("invalid token") from exc
        alg = header.get("alg") if isinstance(header, dict) else None
        if alg == ALGORITHM:
            return self.signer.verify(token)
        kid = header.get("kid")
        # Only the keys whose type allows the header's algorithm (and, if named, its kid).
        keys = [k for k in self._keys_for(alg) if kid is None or k.kid in (None, kid)]
        if not keys:
            raise InvalidToken("no key for this token")
        last: InvalidToken = InvalidToken("invalid token")
        for key in keys:
            try:
                return _decode(
                    token,
                    key.key,
                    key.algorithm,
                    self.signer.audience,
                    self.issuer,
                    self.signer.leeway_seconds,
                )
            except ExpiredToken:
                raise
            except InvalidToken as exc:
                last = exc
        raise last

    def _keys_for(self, alg: object) -> Iterable[PublicKey]:
        return (k for k in self.public_keys if k.algorithm == alg)


def _decode(
    token: str, key: Any, algorithm: str, audience: str, issuer: str | None, leeway: int
) -> Principal:
    """One key, one algorithm; `exp`, `aud`, `sub` (and, given an issuer, `iss`) required."""
    if len(token) > MAX_TOKEN_LENGTH:
        raise InvalidToken("token too long")
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[algorithm],
            audience=audience,
            issuer=issuer,
            options={
                "require_exp": True,
                "require_aud": True,
                "require_sub": True,
                "require_iss": issuer is not None,
                "verify_exp": True,
                "verify_aud": True,
                "verify_iss": issuer is not None,
                "leeway": leeway,
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
    jti = claims.get("jti")
    iat = claims.get("iat")
    scope = claims.get("scope", "")
    if (
        not isinstance(subject, str)
        or not subject
        or not isinstance(symbols, list)
        or not all(isinstance(s, str) for s in symbols)
        or not isinstance(exp, int | float)
        or not isinstance(jti, str | None)
        or not isinstance(iat, int | float | None)
        or not isinstance(scope, str)
    ):
        raise InvalidToken("invalid token claims")
    return Principal(
        subject=subject,
        symbols=frozenset(symbols),
        expires_at=float(exp),
        token_id=jti,
        issued_at=float(iat) if iat is not None else None,
        scopes=frozenset(scope.split()),
    )


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
