"""app/config.py: Settings, as an operator sets them, and `.env.example` that documents them."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import ValidationError

from app.config import DEV_DEMO_CLIENT_SECRET, DEV_JWT_SECRET, Settings
from tests.support import ROOT

GOOD_JWT_SECRET = "k" * 16 + "0123456789abcdef"  # 32 chars
GOOD_DEMO_SECRET = "a-demo-secret-only-prod-knows"
NAME_LINE = re.compile(r"^\s*(?:#\s*)?([A-Z][A-Z0-9_]*)=", re.MULTILINE)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Only what a test sets reaches Settings: no variable of the shell running pytest."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    yield


def settings(**values: Any) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


class TestProdRefusesDevSecrets:
    def test_default_jwt_secret_is_refused(self) -> None:
        with pytest.raises(ValidationError, match="JWT_SECRET"):
            settings(env="prod", demo_client_secret=GOOD_DEMO_SECRET)

    def test_explicit_dev_jwt_secret_is_refused(self) -> None:
        with pytest.raises(ValidationError, match="JWT_SECRET"):
            settings(env="prod", jwt_secret=DEV_JWT_SECRET, demo_client_secret=GOOD_DEMO_SECRET)

    @pytest.mark.parametrize("secret", ["short", "x" * 31])
    def test_short_jwt_secret_is_refused(self, secret: str) -> None:
        with pytest.raises(ValidationError, match="JWT_SECRET"):
            settings(env="prod", jwt_secret=secret, demo_client_secret=GOOD_DEMO_SECRET)

    def test_a_strong_jwt_secret_alone_starts_prod(self) -> None:
        """Prod seeds no demo client, so the demo secret's default opens nothing there."""
        loaded = settings(env="prod", jwt_secret=GOOD_JWT_SECRET)

        assert (loaded.env, loaded.jwt_secret) == ("prod", GOOD_JWT_SECRET)
        assert loaded.demo_client_secret == DEV_DEMO_CLIENT_SECRET

    def test_the_default_demo_secret_given_explicitly_starts_prod(self) -> None:
        loaded = settings(
            env="prod", jwt_secret=GOOD_JWT_SECRET, demo_client_secret=DEV_DEMO_CLIENT_SECRET
        )

        assert loaded.env == "prod"

    def test_jwt_secret_alone_from_the_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("ENV", "prod")
        monkeypatch.setenv("JWT_SECRET", GOOD_JWT_SECRET)

        assert settings().env == "prod"

    def test_weak_jwt_secret_is_refused_whatever_the_demo_secret(self) -> None:
        with pytest.raises(ValidationError, match="JWT_SECRET"):
            settings(env="prod", jwt_secret="x" * 31)

    def test_refused_from_the_environment_too(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("ENV", "prod")
        monkeypatch.setenv("DEMO_CLIENT_SECRET", GOOD_DEMO_SECRET)

        with pytest.raises(ValidationError, match="JWT_SECRET"):
            settings()

    def test_good_secrets_are_accepted(self) -> None:
        loaded = settings(
            env="prod", jwt_secret=GOOD_JWT_SECRET, demo_client_secret=GOOD_DEMO_SECRET
        )

        assert loaded.env == "prod"
        assert loaded.jwt_secret == GOOD_JWT_SECRET

    def test_good_secrets_from_the_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("ENV", "prod")
        monkeypatch.setenv("JWT_SECRET", GOOD_JWT_SECRET)
        monkeypatch.setenv("DEMO_CLIENT_SECRET", GOOD_DEMO_SECRET)

        loaded = settings()

        assert (loaded.env, loaded.jwt_secret, loaded.demo_client_secret) == (
            "prod",
            GOOD_JWT_SECRET,
            GOOD_DEMO_SECRET,
        )

    def test_dev_runs_with_the_defaults(self) -> None:
        loaded = settings()

        assert loaded.env == "dev"
        assert loaded.jwt_secret == DEV_JWT_SECRET
        assert loaded.demo_client_secret == DEV_DEMO_CLIENT_SECRET


class TestAllowedOrigins:
    def test_unset_is_empty(self) -> None:
        assert settings().allowed_origins == []

    def test_comma_list_from_the_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv(
            "ALLOWED_ORIGINS",
            "https://a.example.com, https://b.example.com/ ,,http://localhost:3000",
        )

        assert settings().allowed_origins == [
            "https://a.example.com",
            "https://b.example.com",
            "http://localhost:3000",
        ]

    def test_single_origin(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("ALLOWED_ORIGINS", "https://app.example.com")

        assert settings().allowed_origins == ["https://app.example.com"]

    def test_empty_variable_means_unset(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("ALLOWED_ORIGINS", "")

        assert settings().allowed_origins == []

    def test_list_given_in_code(self) -> None:
        assert settings(allowed_origins=["https://a.example.com"]).allowed_origins == [
            "https://a.example.com"
        ]


class TestEnvExample:
    """The contract: every setting is listed, with its default, in `.env.example`."""

    @pytest.fixture
    def example(self) -> str:
        path = ROOT / ".env.example"
        assert path.is_file(), ".env.example is missing at the repository root"
        return path.read_text(encoding="utf-8")

    def test_lists_every_setting(self, example: str) -> None:
        listed = set(NAME_LINE.findall(example))
        fields = {name.upper() for name in Settings.model_fields}

        assert sorted(fields - listed) == []

    def test_lists_nothing_that_is_not_a_setting(self, example: str) -> None:
        listed = set(NAME_LINE.findall(example))
        fields = {name.upper() for name in Settings.model_fields}

        assert sorted(listed - fields) == []

    def test_values_are_the_defaults(self, example: str) -> None:
        """Copied to `.env` unchanged, the example changes nothing."""
        from_example = Settings(_env_file=ROOT / ".env.example")  # type: ignore[call-arg]

        assert from_example.model_dump() == settings().model_dump()
