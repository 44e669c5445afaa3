"""Refusing to start with one clear line: a feed source that cannot start as configured (a
replay file that is missing or has no header, say) stops the service before anything runs,
with the source's own message and no traceback.

`python -m app` and `python -m app.feed` check before they start a server or a producer (a
producer process that failed later would only be restarted, again and again); the ASGI
lifespan, for any other server, checks before it builds anything and fails startup.
"""

from __future__ import annotations

import sys
from typing import NoReturn

from app.config import Settings
from app.feed.sources import SourceNotReady, create_source
from app.feed.stats import FeedStats

EXIT_STATUS = 2  # a configuration error, as for a bad command line


def check_source(settings: Settings) -> None:
    """SourceNotReady if FEED_SOURCE cannot start as configured. The source built to find
    out is dropped: where the producer runs, it builds its own."""
    create_source(settings, FeedStats(settings.feed_source))


def cannot_start(error: SourceNotReady) -> str:
    """The one line an operator sees."""
    return f"cannot start: {error}"


def exit_cannot_start(error: SourceNotReady) -> NoReturn:
    print(f"pricefeed: {cannot_start(error)}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_STATUS)


def exit_unless_source_ready(settings: Settings) -> None:
    """For a command line: return if the source can start, else exit with the one line on
    stderr and status 2."""
    try:
        check_source(settings)
    except SourceNotReady as error:
        exit_cannot_start(error)
