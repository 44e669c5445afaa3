"""Which WebSocket protocol to serve with: pricefeed's own (`WS_IMPL=fast`) only on the uvicorn
and websockets releases it was tested with, uvicorn's stock websockets-sansio otherwise.

app/server/protocol.py subclasses uvicorn's protocol and uses some of its private attributes
and websockets' private parser. A release that renames one would break it at import or, worse,
mid-connection. So before the fast protocol is used the installed versions are checked against
the tested range, and the module is imported under a try. Either failing, the service starts
anyway with the stock protocol and the plain ASGI send path (no direct writes), and logs one
warning that says why. `pyproject.toml` states the same ranges for its two dependencies.

The lower bounds are the oldest releases that have everything the protocol uses: uvicorn
0.52.1 is the first whose websockets-sansio protocol has `disconnected`, `close_timer` and
`close_timeout` (0.35.0 added the protocol; 0.52.0 still lacks them); websockets has the
`Protocol.parse`, `reader`, `State` and `http11.Request` we use from 13.0 on, but the test
suite, which is what proves the range, runs from 14.1. The upper bounds are the next uvicorn
minor and the next websockets major after the newest tested (uvicorn 0.55.0, websockets 17.4).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import import_module, metadata
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importing the protocol is what fast_protocol() guards
    import asyncio

    from app.config import Settings
    from app.server.protocol import PricefeedWebSocketProtocol

logger = logging.getLogger(__name__)

STOCK = "websockets-sansio"
PROTOCOL_MODULE = "app.server.protocol"
HTTP_PROTOCOL_MODULE = "app.server.http_protocol"


@dataclass(frozen=True)
class Tested:
    """A package and the releases pricefeed's protocol was tested with: [minimum, below)."""

    package: str
    minimum: str
    below: str

    @property
    def spec(self) -> str:
        """As pyproject.toml writes it."""
        return f">={self.minimum},<{self.below}"

    def admits(self, version: str) -> bool:
        release, low, high = _release(version), _release(self.minimum), _release(self.below)
        assert low is not None and high is not None
        return release is not None and low <= release < high


TESTED = (
    Tested("uvicorn", minimum="0.52.1", below="0.56"),
    Tested("websockets", minimum="14.1", below="18"),
)


def _release(version: str) -> tuple[int, ...] | None:
    """The release numbers of a version string ("0.52.1rc1" → (0, 52, 1)); a pre-release of
    the upper bound thus counts as the upper bound, outside the range. None if unreadable."""
    match = re.match(r"\d+(\.\d+)*", version)
    if match is None:
        return None
    release = tuple(int(part) for part in match.group().split("."))
    return release + (0,) * (3 - len(release))


def installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def outside_tested_range(versions: dict[str, str | None]) -> str | None:
    """Why these installed versions cannot run the fast protocol, or None if they can."""
    for tested in TESTED:
        version = versions.get(tested.package)
        if version is None:
            return f"{tested.package} version unknown (tested: {tested.spec})"
        if not tested.admits(version):
            return f"{tested.package} {version} is outside the tested range {tested.spec}"
    return None


@lru_cache(maxsize=1)
def fast_protocol() -> type[PricefeedWebSocketProtocol] | None:
    """pricefeed's protocol class, or None (logged once per process) when it must not be used."""
    why = outside_tested_range({t.package: installed_version(t.package) for t in TESTED})
    if why is None:
        try:
            protocol: type[PricefeedWebSocketProtocol]
            protocol = import_module(PROTOCOL_MODULE).PricefeedWebSocketProtocol
            import_module(HTTP_PROTOCOL_MODULE)  # its HTTP side (`resolve`) goes with it
            return protocol
        except Exception as exc:  # any failure means: not this protocol
            # Inside the tested range this is a bug: its traceback goes to the log (debug).
            logger.debug("importing pricefeed's protocols failed", exc_info=True)
            why = f"importing pricefeed's protocols failed ({type(exc).__name__}: {exc})"
    logger.warning(
        "WS_IMPL=fast unavailable: %s; serving WebSockets with uvicorn's %s protocol and "
        "no direct writes",
        why,
        STOCK,
    )
    return None


@dataclass(frozen=True)
class Serving:
    """The settings the service runs with, uvicorn's `ws` and `http` options for them (a
    protocol class, or the name of one of uvicorn's), and whether `fast` had to give way to
    the stock one."""

    settings: Settings
    ws: type[asyncio.Protocol] | str
    fell_back: bool = False
    # pricefeed's with `fast`: the transport in scope, bounded request heads, the cap's probe
    http: type[asyncio.Protocol] | str = "auto"


def resolve(settings: Settings) -> Serving:
    """What `settings` ask for, or the stock protocol if they ask for an unavailable `fast`."""
    if settings.ws_impl != "fast":
        return Serving(settings, settings.ws_impl)
    protocol = fast_protocol()
    if protocol is None:
        stock = settings.model_copy(update={"ws_impl": STOCK, "fanout_direct_writes": False})
        return Serving(stock, STOCK, fell_back=True)
    protocol.configure(send_buffer_bytes=settings.ws_send_buffer_bytes)
    http = import_module(HTTP_PROTOCOL_MODULE).PricefeedHTTPProtocol
    http.configure(
        header_timeout=settings.ws_handshake_timeout_seconds,
        max_connections=settings.open_connection_cap,
    )
    return Serving(settings, protocol, http=http)
