"""Futures whose outcome nobody awaits (a write given up on, a PING nobody waits for): their
outcome is retrieved all the same, so that asyncio logs no "exception was never retrieved"."""

from __future__ import annotations

import asyncio
from typing import Any


def consume(future: asyncio.Future[Any]) -> None:
    """A done callback: retrieve `future`'s outcome, whatever it is."""
    if not future.cancelled():
        future.exception()
