"""An external issuer's tokens (RS256, ES256) verify with its public key, PEM or JWKS, and
nothing else does: the key's type fixes the one algorithm it verifies."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from websockets.exceptions import ConnectionClosed

from app.security import (
    ExpiredToken,
    InvalidToken,
    TokenVerifier,
    load_public_keys,
)
from tests.auth import keys
from tests.support import ROOT, LiveApp, open_stream, signer, token

RSA, EC = keys.rsa_key(), keys.ec_key()  # made once: an RSA key takes a while


def verifier(**files: str) -> TokenVerifier:
    return TokenVerifier(
        signer=signer(), public_keys=tuple(load_public_keys(**files)), issuer=keys.ISSUER
    )


@pytest.fixture
def pem_files(tmp_path: Path) -> dict[str, str]:
    return {
        "rsa": keys.write_pem(tmp_path / "rsa.pem", RSA),
        "ec": keys.write_pem(tmp_path / "ec.pem", EC),
    }


@pytest.fixture
def jwks_file(tmp_path: Path) -> str:
    return keys.write_jwks(tmp_path / "jwks.json", {"r1": RSA, "e1": EC})


class TestVerify:
    @pytest.mark.parametrize("kind", ["rsa", "ec"])
    def test_a_token_verifies_with_its_pem(self, pem_files: dict[str, str], kind: str) -> None:
        key = RSA if kind == "rsa" else EC
        principal = verifier(pem_file=pem_files[kind]).verify(
            keys.sign(key, keys.claims(jti="j-1", symbols=["AAPL"]))
        )
        assert (principal.subject, principal.symbols, principal.token_id) == (
            "partner",
            frozenset({"AAPL"}),
            "j-1",
        )

    @pytest.mark.parametrize("kid", ["r1", "e1", None])
    def test_tokens_verify_with_a_jwks(self, jwks_file: str, kid: str | None) -> None:
        check = verifier(jwks_file=jwks_file)
        assert check.verify(keys.sign(RSA, kid=kid if kid != "e1" else None)).subject == "partner"
        assert check.verify(keys.sign(EC, kid=kid if kid != "r1" else None)).subject == "partner"

    def test_an_external_scope_claim_is_honoured(self, pem_files: dict[str, str]) -> None:
        check = verifier(pem_file=pem_files["ec"])

        assert check.verify(keys.sign(EC, keys.claims(scope="publish"))).scopes == {"publish"}
        with pytest.raises(InvalidToken):
            check.verify(keys.sign(EC, keys.claims(scope=["publish"])))

    def test_our_tokens_still_verify(self, pem_files: dict[str, str]) -> None:
        assert verifier(pem_file=pem_files["rsa"]).verify(token("ours")).subject == "ours"

    @pytest.mark.parametrize(
        "make",
        [
            pytest.param(lambda: keys.sign(RSA, keys.claims(iss="https://evil.example")), id="iss"),
            pytest.param(lambda: keys.sign(RSA, keys.claims(iss=None)), id="no-iss"),
            pytest.param(lambda: keys.sign(RSA, keys.claims(aud="other")), id="aud"),
            pytest.param(lambda: keys.sign(RSA, keys.claims(exp=None)), id="no-exp"),
            pytest.param(lambda: keys.sign(keys.rsa_key()), id="other-rsa-key"),
            pytest.param(lambda: keys.sign(keys.ec_key()), id="other-ec-key"),
            pytest.param(lambda: keys.sign_hmac(keys.public_pem(RSA)), id="hs256-rsa-pem"),
            pytest.param(lambda: keys.sign_hmac(keys.public_pem(EC)), id="hs256-ec-pem"),
            pytest.param(lambda: keys.sign_hmac(b"", alg="none"), id="alg-none"),
        ],
    )
    def test_rejected(
        self, pem_files: dict[str, str], jwks_file: str, make: Callable[[], str]
    ) -> None:
        for check in (verifier(pem_file=pem_files["rsa"]), verifier(jwks_file=jwks_file)):
            with pytest.raises(InvalidToken):
                check.verify(make())

    def test_a_kid_picks_its_key_alone(self, jwks_file: str) -> None:
        with pytest.raises(InvalidToken):
            verifier(jwks_file=jwks_file).verify(keys.sign(RSA, kid="e1"))
        with pytest.raises(InvalidToken):
            verifier(jwks_file=jwks_file).verify(keys.sign(RSA, kid="unknown"))

    def test_an_rsa_key_does_not_verify_es256(self, pem_files: dict[str, str]) -> None:
        with pytest.raises(InvalidToken):
            verifier(pem_file=pem_files["rsa"]).verify(keys.sign(EC))

    def test_expired_is_expired(self, pem_files: dict[str, str]) -> None:
        with pytest.raises(ExpiredToken):
            verifier(pem_file=pem_files["ec"]).verify(keys.sign(EC, keys.claims(exp=1)))

    def test_without_keys_external_tokens_are_refused(self) -> None:
        with pytest.raises(InvalidToken):
            verifier().verify(keys.sign(RSA))


class TestKeyFiles:
    def test_the_algorithm_follows_the_key_type(self, pem_files: dict[str, str]) -> None:
        assert [k.algorithm for k in load_public_keys(pem_file=pem_files["rsa"])] == ["RS256"]
        assert [k.algorithm for k in load_public_keys(pem_file=pem_files["ec"])] == ["ES256"]

    def test_a_private_key_is_refused(self, tmp_path: Path) -> None:
        (tmp_path / "private.pem").write_bytes(keys.private_pem(EC))
        with pytest.raises(ValueError, match="private"):
            load_public_keys(pem_file=str(tmp_path / "private.pem"))

    def test_other_curves_are_refused(self, tmp_path: Path) -> None:
        path = keys.write_pem(tmp_path / "p384.pem", keys.ec_key(ec.SECP384R1()))
        with pytest.raises(ValueError):
            load_public_keys(pem_file=path)

    def test_a_jwk_alg_against_its_key_type_is_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "jwks.json"
        path.write_text(json.dumps({"keys": [keys.jwk(RSA, "r") | {"alg": "HS256"}]}))
        with pytest.raises(ValueError, match="alg"):
            load_public_keys(jwks_file=str(path))


# ---------------------------------------------------------------- on the wire

Live = Callable[..., AbstractAsyncContextManager[LiveApp]]


async def _rest(server: LiveApp, bearer: str) -> httpx.Response:
    """The latest AAPL price with `bearer`; a 503 (the feed's first tick not out yet, just
    after startup) is asked again, for up to 5 s."""
    headers = {"Authorization": f"Bearer {bearer}"}
    async with httpx.AsyncClient(base_url=server.http) as http:
        for _ in range(50):
            response = await http.get("/v1/prices/AAPL", headers=headers)
            if response.status_code != 503:
                break
            await asyncio.sleep(0.1)
        return response


async def _ws_close(server: LiveApp, bearer: str) -> int | None:
    """None if the stream opened and sent its snapshot; otherwise its close code."""
    try:
        async with open_stream(f"{server.ws}/v1/ws/prices/AAPL?token={bearer}") as stream:
            await stream.recv_type("snapshot")
            return None
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else None


@pytest.mark.parametrize("source", ["pem", "jwks"])
async def test_external_tokens_on_rest_and_websocket(
    live: Live, pem_files: dict[str, str], jwks_file: str, source: str
) -> None:
    settings: dict[str, Any] = {"jwt_issuer": keys.ISSUER}
    if source == "pem":
        settings["jwt_public_key_file"] = pem_files["ec"]
        accepted = [keys.sign(EC)]
    else:
        settings["jwt_jwks_file"] = jwks_file
        accepted = [keys.sign(RSA, kid="r1"), keys.sign(EC, kid="e1")]
    async with live(**settings) as server:
        for good in accepted:
            assert (await _rest(server, good)).status_code == 200
            assert await _ws_close(server, good) is None
        for bad in (
            keys.sign_hmac(keys.public_pem(EC)),
            keys.sign(EC, keys.claims(iss="https://evil.example")),
        ):
            assert (await _rest(server, bad)).status_code == 401
            assert await _ws_close(server, bad) == 4401


def test_keys_verify_without_cryptography(tmp_path: Path) -> None:
    """The image installs no `cryptography`: python-jose verifies with its rsa and ecdsa
    backends there, and the key types still fix the algorithms."""
    pem = keys.write_pem(tmp_path / "ec.pem", EC)
    jwks = keys.write_jwks(tmp_path / "jwks.json", {"r1": RSA})
    tokens = {
        "es": keys.sign(EC),
        "rs": keys.sign(RSA, kid="r1"),
        "hs-ec-pem": keys.sign_hmac(keys.public_pem(EC)),
        "hs-rsa-pem": keys.sign_hmac(keys.public_pem(RSA)),
    }
    script = f"""
import json, sys
sys.modules["cryptography"] = None
from jose import jwk
assert "rsa_backend" in jwk.get_key("RS256").__module__, jwk.get_key("RS256")
from app.security import InvalidToken, TokenVerifier, load_public_keys
from tests.support import signer
check = TokenVerifier(
    signer=signer(),
    public_keys=tuple(load_public_keys(pem_file={pem!r}, jwks_file={jwks!r})),
    issuer={keys.ISSUER!r},
)
verdicts = {{}}
for name, token in {tokens!r}.items():
    try:
        verdicts[name] = check.verify(token).subject
    except InvalidToken:
        verdicts[name] = None
print(json.dumps(verdicts))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "es": "partner",
        "rs": "partner",
        "hs-ec-pem": None,
        "hs-rsa-pem": None,
    }
