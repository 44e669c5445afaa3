"""Test keys of an external issuer (RSA and EC P-256, made with `cryptography`), and tokens
signed with them by hand, so the library under test plays no part in making them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

ISSUER = "https://issuer.example"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _json(value: Any) -> str:
    return _b64(json.dumps(value, separators=(",", ":")).encode())


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def ec_key(curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(curve or ec.SECP256R1())


def public_pem(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def private_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _int(value: int, size: int | None = None) -> str:
    size = size or (value.bit_length() + 7) // 8
    return _b64(value.to_bytes(size, "big"))


def jwk(key: PrivateKey, kid: str) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        numbers = key.public_key().public_numbers()
        return {"kty": "RSA", "kid": kid, "use": "sig", "n": _int(numbers.n), "e": _int(numbers.e)}
    point = key.public_key().public_numbers()
    return {
        "kty": "EC",
        "kid": kid,
        "use": "sig",
        "crv": "P-256",
        "x": _int(point.x, 32),
        "y": _int(point.y, 32),
    }


def write_pem(path: Path, key: PrivateKey) -> str:
    path.write_bytes(public_pem(key))
    return str(path)


def write_jwks(path: Path, keys: dict[str, PrivateKey]) -> str:
    path.write_text(json.dumps({"keys": [jwk(key, kid) for kid, key in keys.items()]}))
    return str(path)


def claims(**overrides: Any) -> dict[str, Any]:
    """An external token's claims (same as ours, plus `iss`); `None` removes one."""
    now = int(time.time())
    values: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "partner",
        "aud": "pricefeed",
        "iat": now,
        "exp": now + 300,
        "jti": f"ext-{time.monotonic_ns()}",
        "symbols": ["*"],
        "scope": "prices:read",
    }
    values.update(overrides)
    return {k: v for k, v in values.items() if v is not None}


def sign(key: PrivateKey, payload: dict[str, Any] | None = None, kid: str | None = None) -> str:
    """RS256 with an RSA key, ES256 (raw r||s) with an EC key."""
    alg = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
    header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    signing_input = f"{_json(header)}.{_json(payload or claims())}".encode()
    if isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    else:
        r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return f"{signing_input.decode()}.{_b64(signature)}"


def sign_hmac(secret: bytes, payload: dict[str, Any] | None = None, alg: str = "HS256") -> str:
    """An HMAC token (or `alg: none`, unsigned) with any bytes as the secret."""
    signing_input = f"{_json({'alg': alg, 'typ': 'JWT'})}.{_json(payload or claims())}".encode()
    if alg == "none":
        return f"{signing_input.decode()}."
    signature = hmac.new(secret, signing_input, hashlib.sha256).digest()
    return f"{signing_input.decode()}.{_b64(signature)}"
