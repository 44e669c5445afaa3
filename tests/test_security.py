"""app/security.py: access tokens (TokenSigner) and client secrets (hash_secret/verify_secret).

Hostile tokens are built by hand (base64url + HMAC) so each test controls exactly the header,
claims and signature a client could send, independently of the JWT library under test.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from typing import Any

import pytest

from app.security import (
    ExpiredToken,
    InvalidToken,
    Principal,
    TokenSigner,
    hash_secret,
    verify_secret,
)
from tests.support import JWT_SECRET, signer

OTHER_SECRET = "another-secret-another-secret-0000"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _json(value: Any) -> str:
    return _b64(json.dumps(value, separators=(",", ":")).encode())


def forge(
    claims: dict[str, Any],
    *,
    alg: str = "HS256",
    secret: str = JWT_SECRET,
    digest: Any = hashlib.sha256,
    header: dict[str, Any] | None = None,
) -> str:
    """A JWT with the given header and claims, HMAC-signed with `digest` (unsigned for `none`)."""
    head = _json(header if header is not None else {"alg": alg, "typ": "JWT"})
    body = _json(claims)
    signing_input = f"{head}.{body}".encode()
    if alg.lower() == "none":
        return f"{head}.{body}."
    signature = hmac.new(secret.encode(), signing_input, digest).digest()
    return f"{head}.{body}.{_b64(signature)}"


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid claims for the test audience; `None` removes a claim."""
    now = int(time.time())
    values: dict[str, Any] = {
        "sub": "alice",
        "aud": "pricefeed",
        "iat": now,
        "exp": now + 300,
        "symbols": ["AAPL", "MSFT"],
    }
    values.update(overrides)
    return {k: v for k, v in values.items() if v is not None}


class TestIssueAndVerify:
    def test_issued_token_verifies_to_its_principal(self) -> None:
        before = time.time()
        issued = signer().issue(subject="alice", symbols=["AAPL", "MSFT"], ttl_seconds=120)

        principal = signer().verify(issued)

        assert isinstance(principal, Principal)
        assert principal.subject == "alice"
        assert principal.symbols == frozenset({"AAPL", "MSFT"})
        assert before + 119 <= principal.expires_at <= time.time() + 121
        assert principal.may_read("AAPL") and not principal.may_read("TSLA")
        assert not principal.all_symbols

    def test_token_ids_paste_after_admin_revoke_jti(self) -> None:
        """`python -m app.admin revoke --jti <id>`: an id starting with "-" would be read as
        an option (one in 64 of the URL-safe ids did; a test caught it)."""
        ids = {
            signer().verify(signer().issue(subject="a", symbols=["*"])).token_id for _ in range(300)
        }

        assert len(ids) == 300
        assert all(i is not None and re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)

    def test_wildcard_token_reads_every_symbol(self) -> None:
        principal = signer().verify(signer().issue(subject="ops", symbols=["*"]))

        assert principal.all_symbols
        assert principal.may_read("BTC-USD")

    def test_issued_token_is_hs256_with_the_configured_audience(self) -> None:
        issued = signer().issue(subject="alice", symbols=["AAPL"])
        head, body, _ = issued.split(".")

        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
        payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        assert header["alg"] == "HS256"
        assert payload["aud"] == "pricefeed"
        assert payload["sub"] == "alice"
        assert payload["symbols"] == ["AAPL"]
        assert isinstance(payload["exp"], int)

    def test_hand_built_hs256_token_verifies(self) -> None:
        """The forging helper is right, so the rejections below are for the stated reason."""
        principal = signer().verify(forge(claims()))

        assert principal.subject == "alice"


class TestScopes:
    def test_issued_scopes_come_back_as_a_set(self) -> None:
        issued = signer().issue(subject="feeder", symbols=[], scopes=["publish"])

        assert signer().verify(issued).scopes == frozenset({"publish"})

    def test_the_claim_is_space_separated_and_only_there_when_there_are_scopes(self) -> None:
        def payload(issued: str) -> dict[str, Any]:
            body = issued.split(".")[1]
            decoded: dict[str, Any] = json.loads(
                base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            )
            return decoded

        with_scope = signer().issue(subject="f", symbols=[], scopes=["publish", "publish"])
        reader = signer().issue(subject="r", symbols=["AAPL"])

        assert payload(with_scope)["scope"] == "publish"
        assert "scope" not in payload(reader)
        assert signer().verify(reader).scopes == frozenset()

    def test_a_hand_built_oauth_scope_claim_is_split_on_spaces(self) -> None:
        principal = signer().verify(forge(claims(scope="read  publish")))

        assert principal.scopes == frozenset({"read", "publish"})


class TestRejectedTokens:
    @pytest.mark.parametrize(
        "token",
        [
            pytest.param(forge(claims(), alg="none"), id="alg-none"),
            pytest.param(forge(claims(), alg="None"), id="alg-None"),
            pytest.param(
                forge(claims(), header={"alg": "none", "typ": "JWT"}, alg="HS256"),
                id="alg-none-header-with-valid-hs256-signature",
            ),
            pytest.param(forge(claims(), alg="HS512", digest=hashlib.sha512), id="hs512"),
            pytest.param(forge(claims(), alg="HS384", digest=hashlib.sha384), id="hs384"),
            pytest.param(forge(claims(), header={"alg": "RS256", "typ": "JWT"}), id="rs256-header"),
            pytest.param(forge(claims(aud="other-service")), id="wrong-aud"),
            pytest.param(forge(claims(aud=None)), id="missing-aud"),
            pytest.param(forge(claims(), secret=OTHER_SECRET), id="bad-signature"),
            pytest.param(forge(claims(exp=None)), id="missing-exp"),
            pytest.param(forge(claims(sub=None)), id="missing-sub"),
            pytest.param(forge(claims(sub="")), id="empty-sub"),
            pytest.param(forge(claims(symbols="AAPL")), id="symbols-string"),
            pytest.param(forge(claims(symbols={"AAPL": True})), id="symbols-object"),
            pytest.param(forge(claims(symbols=None)), id="missing-symbols"),
            pytest.param(forge(claims(symbols=["AAPL", 7])), id="symbols-non-string-item"),
            pytest.param(forge(claims(scope=["publish"])), id="scope-list"),
            pytest.param(forge(claims(scope=7)), id="scope-number"),
        ],
    )
    def test_rejected(self, token: str) -> None:
        with pytest.raises(InvalidToken):
            signer().verify(token)

    def test_tampered_claims_are_rejected(self) -> None:
        head, _, signature = signer().issue(subject="alice", symbols=["AAPL"]).split(".")
        widened = _json(claims(symbols=["*"]))

        with pytest.raises(InvalidToken):
            signer().verify(f"{head}.{widened}.{signature}")

    def test_token_for_another_audience_signer_is_rejected(self) -> None:
        issued = signer(audience="other-service").issue(subject="alice", symbols=["*"])

        with pytest.raises(InvalidToken):
            signer().verify(issued)

    def test_past_exp_raises_expired(self) -> None:
        issued = signer().issue(subject="alice", symbols=["*"], ttl_seconds=-10)

        with pytest.raises(ExpiredToken):
            signer().verify(issued)

    def test_expired_is_an_invalid_token(self) -> None:
        """Callers that only catch InvalidToken still refuse an expired token."""
        with pytest.raises(InvalidToken):
            signer().verify(forge(claims(exp=int(time.time()) - 60)))

    def test_leeway_accepts_a_just_expired_token(self) -> None:
        lenient = TokenSigner(
            secret=JWT_SECRET, audience="pricefeed", ttl_seconds=60, leeway_seconds=30
        )

        principal = lenient.verify(forge(claims(exp=int(time.time()) - 5)))

        assert principal.subject == "alice"

    @pytest.mark.parametrize(
        "garbage",
        ["", "garbage", "a.b", "a.b.c", "a.b.c.d", "....", "Bearer x", "eyJ.eyJ.sig", "\x00\xff"],
    )
    def test_garbage_is_rejected(self, garbage: str) -> None:
        with pytest.raises(InvalidToken):
            signer().verify(garbage)


class TestClientSecrets:
    def test_round_trip(self) -> None:
        stored = hash_secret("s3cret-value")

        assert verify_secret("s3cret-value", stored)

    def test_wrong_secret_is_refused(self) -> None:
        stored = hash_secret("s3cret-value")

        assert not verify_secret("s3cret-valuf", stored)
        assert not verify_secret("", stored)

    def test_hash_does_not_contain_the_secret(self) -> None:
        assert "s3cret-value" not in hash_secret("s3cret-value")

    def test_two_hashes_of_one_secret_differ(self) -> None:
        first, second = hash_secret("same"), hash_secret("same")

        assert first != second
        assert verify_secret("same", first) and verify_secret("same", second)

    @pytest.mark.parametrize(
        "stored", ["", "plain-text", "scrypt$onlytwo", "bcrypt$c2FsdA==$ZGlnZXN0", "scrypt$!!$!!"]
    )
    def test_malformed_stored_hash_is_refused(self, stored: str) -> None:
        assert not verify_secret("anything", stored)


def test_a_crafted_deeply_nested_header_is_just_invalid() -> None:
    """A header that exhausts the JSON parser's recursion must be a 401, not a 500."""
    from app.security import InvalidToken

    header = base64.urlsafe_b64encode(b"[" * 2500).rstrip(b"=").decode()
    assert len(header) < 4096  # under the length cap: the parser itself must be survived
    with pytest.raises(InvalidToken):
        signer().verify(f"{header}.e30.sig")
    with pytest.raises(InvalidToken):
        signer().verify("x" * 5000)  # and an oversized token is not parsed at all
