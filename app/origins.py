"""Which browser origins may open streams and call the API (ALLOWED_ORIGINS)."""

from __future__ import annotations

from starlette.requests import HTTPConnection


def origin_allowed(conn: HTTPConnection, allowed: list[str]) -> bool:
    """No Origin header (a non-browser client) is always allowed; otherwise the origin must be
    listed, or, with nothing listed, be the service's own origin."""
    origin = conn.headers.get("origin")
    if origin is None:
        return True
    origin = origin.rstrip("/")
    if allowed:
        return "*" in allowed or origin in allowed
    host = conn.headers.get("host", "")
    scheme = "https" if conn.url.scheme in ("https", "wss") else "http"
    return origin == f"{scheme}://{host}"
