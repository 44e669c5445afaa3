"""Logging setup. Tokens never reach a log line: uvicorn prints request paths with their
query string (`?token=…` from browsers), so every handler carries a redacting filter."""

from __future__ import annotations

import logging
import re
import time
from typing import Any
from urllib.parse import unquote

_SECRETS = re.compile(
    # A `$NAME` after the key is a reference to an environment variable, not a secret.
    r"(?P<key>(?:access_)?token=|client_secret=|Bearer\s+)(?!\$[A-Z_])[^&\s\"']+"
    r"|eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    cleaned = _SECRETS.sub(lambda m: f"{m.group('key') or ''}[redacted]", text)
    if "%" in cleaned:  # a percent-encoded `%74oken=%65yJ…` is still a token to the server
        decoded = unquote(cleaned)
        if _SECRETS.search(decoded):
            cleaned = _SECRETS.sub(lambda m: f"{m.group('key') or ''}[redacted]", decoded)
    return cleaned


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def logging_config(level: str) -> dict[str, Any]:
    """A dictConfig for the app and uvicorn, every handler filtered."""
    fmt = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"redact": {"()": RedactSecrets}},
        "formatters": {
            "default": {"format": fmt},
            "access": {"format": "%(asctime)s %(levelname)-7s access: %(message)s"},
        },
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "default",
                "filters": ["redact"],
            },
            "access": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stdout",
                "formatter": "access",
                "filters": ["redact"],
            },
        },
        "loggers": {
            "": {"handlers": ["default"], "level": level.upper()},
            "uvicorn": {"handlers": ["default"], "level": level.upper(), "propagate": False},
            "uvicorn.error": {"level": level.upper()},
            "uvicorn.access": {"handlers": ["access"], "level": level.upper(), "propagate": False},
        },
    }


_UVICORN_INVALID_UTF8 = "Invalid UTF-8 sequence received from client."
_streams = logging.getLogger("app.prices.ws")


class InvalidUtf8IsTheClients(logging.Filter):
    """uvicorn's websockets-sansio protocol (and ours, built on it) closes a connection that
    sends a text frame that is not UTF-8 with 1007, and logs an ERROR with a traceback: any
    client could fill the log with them. The client's mistake, not the server's: one DEBUG
    line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, UnicodeDecodeError) and record.msg == _UVICORN_INVALID_UTF8:
            _streams.debug("closed a WebSocket with 1007: a text frame that is not UTF-8")
            return False
        return True


def install_client_error_filter() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, InvalidUtf8IsTheClients) for f in logger.filters):
        logger.addFilter(InvalidUtf8IsTheClients())


def install_redaction() -> None:
    """Filter every handler already installed (the app may run under a plain `uvicorn`)."""
    for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactSecrets) for f in handler.filters):
                handler.addFilter(RedactSecrets())


class OncePer:
    """Logs at most one line per `seconds`: an outage that fails every request shows as one
    line (and how many failures the previous window swallowed), not one per request."""

    def __init__(self, logger: logging.Logger, seconds: float) -> None:
        self._logger, self._seconds = logger, seconds
        self._next = 0.0
        self._swallowed = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._swallowed += 1
            return
        if self._swallowed:
            message += f" ({self._swallowed} more since the last such line)"
            self._swallowed = 0
        self._next = now + self._seconds
        self._logger.warning(message, *args)
