"""`python -m app.client latest|history|watch …`: the SDK's command line under its old name,
kept for one release (the contract names it). The client is `pricefeed_client`
(clients/python): `python -m pricefeed_client`, `from pricefeed_client import PricefeedClient`."""

from __future__ import annotations

import sys

from pricefeed_client import ApiError, PricefeedClient, PricefeedError, StreamRefused
from pricefeed_client.cli import main as _main

__all__ = ["ApiError", "PricefeedClient", "PricefeedError", "StreamRefused", "main"]


def main(argv: list[str] | None = None) -> int:
    return _main(argv, prog="python -m app.client")


if __name__ == "__main__":
    sys.exit(main())
